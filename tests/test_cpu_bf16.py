"""bf16 on the CPU: allowed only where the CPU computes bfloat16 natively (both answers of the detection), the
refusal as one line (library, command line, loader node), weights converted without a float32 copy beside them,
the SAM attention's fused bands, and the results against float32."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from resident import mapped_resident_kb

from trident_core import devices
from trident_core.devices import CPU_BF16_ENV, bf16_native, resolve_dtype

CPU = torch.device("cpu")


def get_preset_params(name: str):
    from trident_core import get_preset

    return get_preset(name).params


@pytest.fixture
def native(monkeypatch):
    """native(True) / native(False): the host's detection answers so (the override variable unset)."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)

    def set_answer(yes: bool) -> None:
        monkeypatch.setattr(devices, "_host_bf16", lambda: None if yes else "this CPU has no native bfloat16")
    return set_answer


@pytest.mark.parametrize("capabilities,flags,onednn,why", [
    ({"avx512_bf16": True, "amx_bf16": False}, set(), True, None),  # Zen 4, Cooper Lake
    ({"amx_bf16": True}, set(), True, None),  # Sapphire Rapids
    ({}, {"fpu", "avx512f", "avx512_bf16"}, True, None),  # an older PyTorch: /proc/cpuinfo's flags
    ({"bf16": True, "neon": True}, set(), True, None),  # Graviton 3
    ({}, {"asimd", "bf16", "i8mm"}, True, None),  # Arm Linux's Features line
    ({"avx512_f": True, "avx512_bf16": False, "avx2": True}, {"avx512f", "avx2"}, True, "no native bfloat16"),
    ({"neon": True}, {"asimd"}, True, "no native bfloat16"),  # Graviton 2
    ({"avx512_bf16": True}, {"avx512_bf16"}, False, "no oneDNN"),  # PyTorch could not use it
])
def test_detection_reads_pytorchs_report_and_the_cpus_flags(capabilities, flags, onednn, why):
    got = bf16_native(capabilities, flags, onednn)
    assert got is None if why is None else why in got


def test_cpuinfo_flags_are_read_from_the_operating_system(tmp_path, monkeypatch):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes bf16 i8mm\nCPU part\t: 0xd40\n")
    monkeypatch.setattr(sys, "platform", "linux")
    assert {"amx_bf16", "avx512f"} <= devices._cpuinfo_features(x86)
    assert "bf16" in devices._cpuinfo_features(arm)
    assert devices._cpuinfo_features(tmp_path / "absent") == set()
    monkeypatch.setattr(sys, "platform", "darwin")  # Apple M2 and newer: sysctl hw.optional.arm.FEAT_BF16
    for out, want in (("1\n", {"bf16"}), ("0\n", set()), ("", set())):
        monkeypatch.setattr(subprocess, "run", lambda *a, out=out, **k: types.SimpleNamespace(stdout=out))
        assert devices._cpuinfo_features() == want


def test_bf16_on_a_native_cpu_and_the_refusal_elsewhere(native):
    native(True)
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_dtype("auto", CPU) == torch.float32  # auto stays exact: bf16 is the user's choice
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_dtype("fp16", CPU)
    native(False)
    assert resolve_dtype("auto", CPU) == torch.float32 and resolve_dtype("fp32", CPU) == torch.float32
    with pytest.raises(ValueError) as e:
        resolve_dtype("bf16", CPU)
    msg = str(e.value)
    assert "\n" not in msg and "no native bfloat16" in msg and "use fp32" in msg and CPU_BF16_ENV in msg
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16  # GPUs are not the CPU's business


def test_the_variable_overrides_the_detection(native, monkeypatch):
    native(False)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    native(True)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    with pytest.raises(ValueError, match=f"{CPU_BF16_ENV}=0"):
        resolve_dtype("bf16", CPU)


@pytest.mark.parametrize("value", ["yes", "true", "false", "off", "2", "00"])
def test_a_variable_that_is_neither_1_nor_0_refuses_in_one_line(native, monkeypatch, value):
    """TRIDENT_CPU_BF16=false used to fall back to the detection (and allow bf16 on a native CPU): a value that is
    neither 1 nor 0 refuses bf16 with a line saying what to set, whatever the detection says."""
    native(True)
    monkeypatch.setenv(CPU_BF16_ENV, f" {value} ")
    with pytest.raises(ValueError, match=f"{CPU_BF16_ENV}='{value}' is neither 1 nor 0") as e:
        resolve_dtype("bf16", CPU)
    assert "\n" not in str(e.value)
    monkeypatch.setenv(CPU_BF16_ENV, "")
    assert resolve_dtype("bf16", CPU) == torch.bfloat16  # empty: the detection


def test_this_hosts_detection_matches_its_flags():
    """The real detection on this machine against /proc/cpuinfo read here, independently."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(" ".join(line.split(":", 1)[1] for line in info.read_text().splitlines()
                         if line.startswith(("flags", "Features"))).split())
    has = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) and torch.backends.mkldnn.is_available()
    assert (devices._host_bf16() is None) == has


def test_command_line_refuses_before_touching_a_model_file(native, tmp_path, capsys):
    from trident_core.cli import main

    native(False)
    img = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    rc = main(["segment", str(img), "--classes", "sky, grass", "--precision", "bf16", "--device", "cpu",
               "--no-download", "--clip", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "precision bf16" in err[0] and "use fp32" in err[0], err  # not the file
    assert not (tmp_path / "out").exists()  # a refused run makes no output folder
    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"")
    for argv in (["segment", str(img), "--out", str(tmp_path / "deep" / "er")],
                 ["segment", str(clip), "--out", str(tmp_path / "video")],
                 ["eval", "--preset", "voc21", "--data-root", str(tmp_path), "--out", str(tmp_path / "ev" / "r.json")]):
        rc = main([*argv, *(["--classes", "sky, grass"] if argv[0] == "segment" else []), "--precision", "bf16",
                   "--device", "cpu", "--no-download"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "precision bf16" in err[0], (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "a.png"]


def _resident_mb(path: Path) -> float:
    return mapped_resident_kb(path) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident pages are read from Linux's smaps")
def test_conversion_keeps_no_float32_pages_beside_the_bf16_weights(tmp_path):
    from trident_core.checkpoints import read_state_dict
    from trident_core.models.conversion import FLOAT32, LOW, PAIR, cast

    path = tmp_path / "weights.pth"
    g = torch.Generator().manual_seed(0)
    torch.save({f"w{i}": torch.randn(1024, 1024, generator=g) for i in range(24)} | {"n": torch.arange(5)}, path)
    file = torch.load(path)
    sd = read_state_dict(path)  # memory-mapped
    assert sum(float(v.float().sum()) for v in sd.values()) and _resident_mb(path) > 90  # every page read: 96 MB
    out = cast(sd, torch.bfloat16, lambda key: {"w3": FLOAT32, "w5": PAIR}.get(key, LOW))
    assert _resident_mb(path) < 8  # the float32 pages went with their conversion (w3 kept: 4 MB)
    assert out["w3"].dtype == torch.float32 and torch.equal(out["w3"], file["w3"])
    assert torch.equal(out["n"], file["n"]) and out["n"].dtype == torch.int64
    for k in (f"w{i}" for i in range(24) if i not in (3, 5)):
        assert out[k].dtype == torch.bfloat16 and torch.equal(out[k], file[k].to(torch.bfloat16))
    hi, lo = out["w5"], out["w5_lo"]  # a pair: hi + lo holds the float32 value to 16 bits, hi alone to 8
    w = file["w5"].double()
    err = ((hi.double() + lo.double() - w).abs() / w.abs()).max()
    assert hi.dtype == lo.dtype == torch.bfloat16 and torch.equal(hi, file["w5"].to(torch.bfloat16)) and err < 2**-15
    assert ((hi.double() - w).abs() / w.abs()).max() > 2**-10


def test_bf16_models_hold_bf16_weights_and_sams_decoder_in_float32(small_ckpts, monkeypatch):
    from trident_core.models import load_dino, load_sam

    monkeypatch.setenv(CPU_BF16_ENV, "1")
    dtype = resolve_dtype("bf16", CPU)
    sam = load_sam(small_ckpts["sam"], "cpu", dtype)
    file = torch.load(small_ckpts["sam"])
    for name, p in sam.model.named_parameters():
        want = dtype if name.startswith("image_encoder.") else torch.float32
        assert p.dtype == want and torch.equal(p, file[name].to(want)), name
    assert {p.dtype for p in load_dino(small_ckpts["dino"], "cpu", dtype).model.parameters()} == {torch.bfloat16}


def test_bf16_clip_keeps_its_matrices_as_pairs_and_the_rest_float32(small_ckpts):
    """The image tower's block matrices (all blocks but the last) as bfloat16 pairs, everything else float32: its
    window values close to float32's, the text embeddings exactly float32's."""
    from safetensors.torch import load_file

    from trident_core.models import load_clip
    from trident_core.text import encode_names

    clip = load_clip(small_ckpts["clip"], "cpu", torch.bfloat16)
    exact = load_clip(small_ckpts["clip"], "cpu", torch.float32)
    file = load_file(small_ckpts["clip"])
    buffers = dict(clip.model.named_buffers())
    pairs = 0
    for name, p in clip.model.named_parameters():
        if p.dtype == torch.bfloat16:  # a pair: hi beside its lo buffer
            assert name.startswith("visual.transformer.resblocks.0."), name
            w = file[name].double()
            assert (p.double() + buffers[name + "_lo"].double() - w).abs().max() < 2**-15 * w.abs().max()
            pairs += 1
        else:
            assert p.dtype == torch.float32 and torch.equal(p, file[name]), name
    assert pairs == 4 and clip.dtype == torch.bfloat16 and exact.dtype == torch.float32
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    got, want = clip.window_values(x)[0], exact.window_values(x)[0]
    assert got.dtype == torch.float32 and (got - want).norm() < 0.01 * want.norm()
    names = ["sky", "a horse"]
    assert torch.equal(encode_names(clip, names), encode_names(exact, names))


@pytest.mark.parametrize("channels", [True, False])
@pytest.mark.parametrize("batch,grid", [(1, 16), (3, 7)])  # a global block, windowed blocks
def test_sams_bf16_attention_bands_equal_segment_anythings_forward(batch, grid, channels, monkeypatch):
    """Both ways bf16 attention can go (the timing decides which: the whole grid with the relative positions as
    extra channels, or segment_anything's operations in bands) against segment_anything's forward in float64."""
    from segment_anything.modeling.image_encoder import Attention

    from trident_core.kernels import sam_attention, timing

    monkeypatch.setattr(timing, "decide", lambda key, contenders: timing.Decision(0.0 if channels else 2.0, 1.0))
    monkeypatch.setattr(sam_attention, "query_band", lambda *a, **k: 2 * grid)  # two grid rows per band
    torch.manual_seed(0)
    attn = Attention(64, 4, use_rel_pos=True, input_size=(grid, grid)).eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
        x = torch.randn(batch, grid, grid, 64)
        want = Attention.forward(attn.double(), x.double())
        attn.to(torch.bfloat16)
        got = sam_attention.banded_attention_forward(attn, x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), want, atol=0.03, rtol=0.02), (got.double() - want).abs().max()


def test_the_bf16_attention_timing_compares_both_ways_on_the_whole_grid(monkeypatch):
    """The timing probe runs each contender as it would run (the channels in one call, segment_anything's operations
    band by band), each over the whole grid: timing one band favoured the bands (the channels' keys are built once
    per call), and chose them where the whole grid ran 5x slower."""
    from segment_anything.modeling.image_encoder import Attention

    from trident_core.kernels import sam_attention, timing

    seen = []

    def decide(key, contenders):
        seen.append((key, contenders()))
        return timing.Decision(1.0, 2.0)

    monkeypatch.setattr(timing, "decide", decide)
    monkeypatch.setattr(sam_attention, "query_band", lambda *a, **k: 2 * 16)  # two grid rows per band
    torch.manual_seed(0)
    attn = Attention(64, 4, use_rel_pos=True, input_size=(16, 16)).eval().to(torch.bfloat16)
    with torch.no_grad():
        sam_attention.banded_attention_forward(attn, torch.randn(1, 16, 16, 64).to(torch.bfloat16))
        (key, (ours, theirs)), = seen
        a, b = ours(), theirs()
    assert "whole grid" in key and a.shape == b.shape == (4, 256, 16)
    assert torch.allclose(a.float(), b.float(), atol=0.03, rtol=0.02)


@pytest.mark.parametrize("per_call", [None, 1, 2])
@pytest.mark.parametrize("rel", [True, False])
@pytest.mark.parametrize("grid,rows", [((8, 8), (2, 5)), ((5, 7), (0, 5))])
def test_relative_positions_as_channels_equal_the_biased_softmax(grid, rows, rel, per_call):
    """`augmented` (a band of queries, the relative-position terms as extra channels, mask-free kernel calls of
    `per_call` heads) against softmax(q kᵀ scale + rel_h[key row] + rel_w[key column]) v written out in float64;
    heads in groups give what one call gives, bit for bit."""
    from trident_core.kernels.sam_attention import augmented

    torch.manual_seed(0)
    (gh, gw), (r0, r1) = grid, rows
    b, n, c, scale = 3, gh * gw, 16, 16 ** -0.5
    q, k, v = (torch.randn(b, n, c) for _ in range(3))
    rel_h, rel_w = torch.randn(b, n, gh), torch.randn(b, n, gw)
    band = slice(r0 * gw, r1 * gw)
    logits = (q[:, band].double() @ k.double().transpose(1, 2)) * scale
    if rel:
        key = torch.arange(n)
        logits = logits + rel_h[:, band].double()[:, :, key // gw] + rel_w[:, band].double()[:, :, key % gw]
    want = logits.softmax(-1) @ v.double()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.03)):
        args = (q[:, band].to(dtype), k.to(dtype), v.to(dtype), scale, grid,
                rel_h[:, band].to(dtype) if rel else None, rel_w[:, band].to(dtype) if rel else None)
        got = augmented(*args, per_call=per_call)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (dtype, (got.double() - want).abs().max())
        assert torch.equal(got, augmented(*args))


def test_channel_calls_take_a_few_heads_on_the_cpu_and_all_on_a_gpu():
    """SAM ViT's global blocks (64x64 keys, 64 + 64 + 64 channels): 2 of 12 heads per call in bfloat16 on the CPU,
    where the widened copies of all heads held 76 MB at once."""
    from trident_core.kernels.sam_attention import channel_heads

    assert channel_heads(torch.device("cpu"), 4096, 192, 2) == 2
    assert channel_heads(torch.device("cpu"), 196, 64 + 28, 2) == 116  # (14x14 windows: every head at once)
    assert channel_heads(torch.device("cuda"), 4096, 192, 2) is None


def _mapped_from(t: torch.Tensor, path: Path) -> bool:
    """Whether tensor `t`'s memory lies in a mapping of the file `path` (Linux's /proc/self/maps)."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if parts[-1] == str(path) and start <= ptr < end:
                return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mappings are read from Linux's /proc")
def _vm(field: str) -> float:
    """This process's /proc/self/status figure `field` (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is read from Linux's /proc")
def test_writing_the_converted_copy_holds_one_converted_tensor_at_a_time(tmp_path):
    """A first run streams the copy into its file one converted tensor at a time, releasing the sources' pages as
    it goes: the peak holds a tensor and a release batch, never the converted weights as a whole (until 2026-12
    it held them all, and the heap they left behind raised the first run's later peak by 200 MB), and the model
    maps the copy afterwards."""
    from trident_core.checkpoints import read_state_dict
    from trident_core.models.conversion import converted

    path = tmp_path / "weights.pth"
    g = torch.Generator().manual_seed(0)
    torch.save({f"w{i}": torch.randn(1024, 1024, generator=g) for i in range(64)}, path)  # 256 MB, 128 in bf16
    sd = read_state_dict(path)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    except OSError:
        pytest.skip("this kernel cannot reset the peak")
    before = _vm("VmRSS")
    out = converted(sd, path, "dino", torch.bfloat16, cache=tmp_path / "converted")
    peak = _vm("VmHWM") - before
    (copy,) = (tmp_path / "converted").glob("dino-*.safetensors")
    assert all(_mapped_from(t, copy) for t in out.values())
    assert peak < 64, peak  # a source and its copy at a time; was 128 (all converted) + 32
    assert _vm("VmRSS") - before < 40  # the converted tensors' memory went back; the copy is mapped, not read
    assert all(torch.equal(t, v.bfloat16()) for t, v in zip(out.values(), torch.load(path, mmap=True).values()))


def test_the_converted_copy_is_made_once_and_mapped_by_later_loads(small_ckpts, tmp_path, caplog):
    from safetensors.torch import load_file

    from trident_core import caches
    from trident_core.checkpoints import read_state_dict
    from trident_core.models import load_clip, load_sam

    cache = tmp_path / "converted"
    first = load_sam(small_ckpts["sam"], "cpu", torch.bfloat16, cache)
    (copy,) = cache.glob("sam-*-bfloat16-*.safetensors")
    made = copy.stat().st_ino
    second = load_sam(small_ckpts["sam"], "cpu", torch.bfloat16, cache)
    assert copy.stat().st_ino == made  # mapped, not converted again (a new copy is a new file)
    file = torch.load(small_ckpts["sam"])
    for name, p in second.model.named_parameters():
        want = torch.bfloat16 if name.startswith("image_encoder.") else torch.float32
        assert p.dtype == want and torch.equal(p, file[name].to(want)) and _mapped_from(p, copy), name
    assert all(_mapped_from(p, copy) for p in first.model.image_encoder.parameters())  # written, then mapped
    cut = copy.with_name("cut")
    cut.write_bytes(copy.read_bytes()[:1000])
    cut.replace(copy)  # a copy cut short (a new file: the loaded models map the old one): converted again
    caches.forget()
    with caplog.at_level("WARNING", logger="trident_core.cache"):
        third = load_sam(small_ckpts["sam"], "cpu", torch.bfloat16, cache)
    (warning,) = [r.getMessage() for r in caplog.records if "converted weights" in r.getMessage()]
    assert "damaged or cut short" in warning and "download" not in warning, warning
    assert all(torch.equal(a, b) for a, b in zip(third.model.parameters(), second.model.parameters()))
    assert load_file(copy).keys() == second.model.state_dict().keys() - {"pixel_mean", "pixel_std"}
    assert not list(cache.glob(".*partial*"))
    clips = [load_clip(small_ckpts["clip"], "cpu", torch.bfloat16, cache=cache) for _ in range(2)]  # pairs kept too
    (clip_copy,) = cache.glob("clip-*-bfloat16-*.safetensors")
    lows = [(n, t) for n, t in clips[1].model.named_buffers() if n.endswith("_lo")]
    assert len(lows) == 4 and all(_mapped_from(t, clip_copy) for _, t in lows)
    assert all(torch.equal(t, dict(clips[0].model.named_buffers())[n]) for n, t in lows)
    source = read_state_dict(small_ckpts["clip"])
    for name, t in lows:  # each the rounding error of its float32 weight, rounded (computed here from the file)
        w = source[name.removesuffix("_lo")]
        assert torch.equal(t, (w - w.bfloat16().float()).bfloat16()) and t.abs().max() > 0, name
    float32 = load_sam(small_ckpts["sam"], "cpu", torch.float32, tmp_path / "other")
    assert not (tmp_path / "other").exists()  # nothing to convert, nothing kept
    assert all(torch.equal(p, file[n]) for n, p in float32.model.named_parameters())


DAMAGED_COPIES = ("one byte", "flipped bytes", "cut data", "other shapes", "no checksum", "garbage header",
                  "nested header", "swapped tensors")


def _damage_copy(copy, damage: str) -> None:
    """Damage the converted copy in place as a failing disk or a careless hand would (shapes and dtypes kept where
    the damage allows)."""
    import json
    import struct

    from safetensors.torch import load_file, save_file

    data = bytearray(copy.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    if damage == "one byte":
        copy.write_bytes(b".")
    elif damage == "flipped bytes":  # inside the largest tensor's bytes: NaN or garbage, the structure intact
        at = 8 + length + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__") // 2
        data[at:at + 64] = bytes(255 - b for b in data[at:at + 64])
        copy.write_bytes(bytes(data))
    elif damage == "cut data":  # the data cut in half, the header as written
        copy.write_bytes(bytes(data[:8 + length + (len(data) - 8 - length) // 2]))
    elif damage == "other shapes":  # a 2-d tensor's shape transposed: the bytes and their CRC-32 unchanged
        key = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2
                   and v["shape"][0] != v["shape"][1])
        header[key]["shape"] = header[key]["shape"][::-1]
        text = json.dumps(header).encode()
        text += b" " * (length - len(text))
        copy.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    elif damage == "no checksum":  # the right tensors, written by another program
        save_file(load_file(copy), copy)
    elif damage == "swapped tensors":  # two tensors of one shape and dtype trade bytes: the data and CRC unchanged
        entries = [(k, v) for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2]
        a, b = next((a, b) for a, va in entries for b, vb in entries
                    if a < b and (va["shape"], va["dtype"]) == (vb["shape"], vb["dtype"]))
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (length - len(text))
        copy.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    elif damage == "nested header":  # (Python's JSON parser recursed out of its stack)
        copy.write_bytes(struct.pack("<Q", 100000) + b"[" * 100000)
    else:
        copy.write_bytes(struct.pack("<Q", 12) + b"{not json!}!" + data[8 + length:])


class _FillingDisk:
    """A file on a disk that is full after `left` bytes: a later write raises ENOSPC."""

    def __init__(self, f, left: int):
        self.f, self.left = f, left

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.left:
            raise OSError(28, "No space left on device")
        self.left -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("damage", ["link", "other tensors", "linked folder", "full disk", "disk filling",
                                    "folder is a file", *DAMAGED_COPIES])
def test_a_converted_copy_that_cannot_be_used_is_a_logged_miss(small_ckpts, tmp_path, damage, caplog, monkeypatch):
    """The converted copy is a cache: a link is neither read nor written through (a new copy replaces the link
    itself), a copy holding other tensors, or damaged in any way (cut to a byte, bytes flipped inside a tensor,
    sparse or expanded tensors of the right shapes), is made again, a copy that
    cannot be written (a full disk, a file where the folder should be) leaves the conversion in memory; each is one
    logged warning, and the weights are the file's."""
    import os

    from safetensors.torch import load_file

    from trident_core import caches
    from trident_core.models import load_sam

    caches.forget()
    cache = tmp_path / "converted"
    want = {n: t for n, t in torch.load(small_ckpts["sam"]).items()}
    if damage in ("link", "other tensors"):
        load_sam(small_ckpts["sam"], "cpu", torch.bfloat16, cache)
        (copy,) = cache.glob("sam-*.safetensors")
        if damage == "link":
            target = tmp_path / "elsewhere.pt"
            torch.save({"x": torch.zeros(1)}, target)
            copy.unlink()
            copy.symlink_to(target)
        else:
            torch.save({"x": torch.zeros(1)}, copy)
    elif damage in DAMAGED_COPIES:
        load_sam(small_ckpts["sam"], "cpu", torch.bfloat16, cache)
        (copy,) = cache.glob("sam-*.safetensors")
        _damage_copy(copy, damage)
        caches.forget()
    elif damage == "folder is a file":
        cache.write_bytes(b"")
    elif damage == "linked folder":
        (tmp_path / "real").mkdir()
        cache.symlink_to(tmp_path / "real")
    else:  # a disk full from the start, or after 16 KB
        from trident_core.models import conversion

        fdopen, left = os.fdopen, 0 if damage == "full disk" else 16 << 10
        monkeypatch.setattr(conversion.os, "fdopen", lambda *a, **k: _FillingDisk(fdopen(*a, **k), left))
    with caplog.at_level("WARNING", logger="trident_core.cache"):
        sam = load_sam(small_ckpts["sam"], "cpu", torch.bfloat16, cache)
    for name, p in sam.model.named_parameters():
        assert torch.equal(p, want[name].to(p.dtype)), name
    assert sum("converted weights" in r.getMessage() for r in caplog.records) == 1
    if damage == "link":
        assert torch.load(target, weights_only=True).keys() == {"x"} and not copy.is_symlink()
    if damage == "other tensors" or damage in DAMAGED_COPIES:
        again = load_file(copy)  # made again
        assert again.keys() >= {"image_encoder.pos_embed"}
        assert all(t.layout == torch.strided and t.is_contiguous() for t in again.values())
    if damage == "linked folder":
        assert not any(f.name.startswith("sam-") for f in (tmp_path / "real").iterdir())
    if damage in ("full disk", "disk filling"):
        assert not list(cache.glob("sam-*"))
    assert not [f for f in os.listdir(tmp_path) if "partial" in f]


@pytest.fixture(scope="module")
def bf16_trident(full_ckpts):
    if devices.cpu_bf16_refusal() is not None:
        pytest.skip(f"bf16 is refused on this CPU: {devices.cpu_bf16_refusal()}")
    from trident_core import Trident

    return Trident.from_files(full_ckpts["clip"], full_ckpts["dino"], full_ckpts["sam"], "cpu", "bf16")


def test_bf16_agrees_with_the_reference_on_the_golden_cases(bf16_trident):
    """The reference's float32 outputs (../shared/reference-golden) against bf16 on full-size weights: labels before
    refinement equal on at least 99.5 % of pixels (#23's target), after it on 97.5 % (SAM's masks pass or fail their
    thresholds whole, each 1.5 to 2 % of astronaut_voc21_refine: measured 98.0 to 99.6 % there on one AMD host, by
    which bfloat16 attention kernel SAM's windows got from the timing race), class probabilities within 0.01 on
    99.9 % of pixels and within 0.1 everywhere (SAM's affinity thresholds its bfloat16 encoder's q, k, v: measured
    0.071 at worst on city_scapes; docs/performance-bf16.md)."""
    import json

    from conftest import GOLDEN
    from test_golden import _classes

    from trident_core import get_preset
    from trident_core.classify import class_probs, upsample

    for case in json.loads((GOLDEN / "cases.json").read_text()):
        gold = np.load(GOLDEN / case["golden"])
        classes = _classes(case)
        params = get_preset(case["preset"]).params.update(refine=case["refine"])
        seg = bf16_trident.segment(str(GOLDEN / case["image"]), classes, params)
        coarse = (seg.labels_coarse if case["refine"] else seg.labels).numpy()
        ref_coarse = gold["labels_coarse"] if case["refine"] else gold["labels"]
        assert (coarse == ref_coarse).mean() >= 0.995, case["name"]
        assert (seg.labels.numpy() == gold["labels"]).mean() >= 0.975, case["name"]
        logits = torch.from_numpy(gold["grid_logits"])
        ref_probs = class_probs(upsample(logits, tuple(case["image_size_hw"])), classes,
                                params.classification.logit_scale)
        diff = ((seg.probs_coarse if case["refine"] else seg.probs) - ref_probs).abs()
        assert (diff < 0.01).float().mean() >= 0.999 and diff.max() < 0.1, case["name"]
        assert 0 < (seg.grid_logits - logits).abs().max() < 0.03, case["name"]  # not float32's results either


def test_sam_stays_float32_in_bf16_mode_only_where_the_thresholds_flip(small_ckpts, monkeypatch):
    """Of the presets only city_scapes (cos_fac 3.0, SPEC's table) thresholds SAM's cosines so high that a bfloat16
    SAM moves probabilities past 0.01; there SAM loads float32 while CLIP and DINO run bfloat16. Other aggregations,
    no aggregation named, other precisions and GPUs keep the one dtype."""
    from trident_core import PRESETS, Trident
    from trident_core.config import AggregateConfig
    from trident_core.pipeline import sam_dtype

    assert {p.name for p in PRESETS.values() if p.params.aggregation.flips_in_bf16} == {"city_scapes"}
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    city = get_preset_params("city_scapes").aggregation
    tr = Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], small_ckpts["sam"], "cpu", "bf16",
                            aggregation=city)
    assert tr.sam.dtype == torch.float32 and tr.clip.dtype == tr.dino.dtype == torch.bfloat16
    for agg in (get_preset_params("voc21").aggregation, None, AggregateConfig(cos_fac=3.0, correlation="attention"),
                AggregateConfig(cos_fac=3.0, paradigm="segment_then_splice")):
        assert sam_dtype(torch.bfloat16, CPU, agg) == torch.bfloat16, agg
    assert sam_dtype(torch.bfloat16, CPU, AggregateConfig(cos_fac=2.0, correlation="cosine")) == torch.float32
    assert sam_dtype(torch.bfloat16, torch.device("cuda"), city) == torch.bfloat16
    assert sam_dtype(torch.float32, CPU, city) == torch.float32


def test_a_bf16_sam_under_flipping_thresholds_is_named_once(small_ckpts, monkeypatch, caplog):
    """A bfloat16 SAM loaded without the aggregation (ComfyUI's loader) running city_scapes: one warning line that
    says to load SAM in fp32, once however many images; none for voc21's thresholds."""
    import logging

    from trident_core import Trident
    from trident_core.pipeline import _warn_once

    monkeypatch.setenv(CPU_BF16_ENV, "1")
    _warn_once.cache_clear()
    tr = Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], small_ckpts["sam"], "cpu", "bf16")
    img = np.random.default_rng(0).integers(0, 255, (64, 128, 3), dtype=np.uint8)
    def pipeline_lines() -> list[str]:  # the small test CLIP's own warning (no open_clip config) is not this one
        return [r.getMessage() for r in caplog.records if r.name == "trident_core.pipeline"]

    with caplog.at_level(logging.WARNING, logger="trident_core.pipeline"):
        tr.segment(img, "sky, road", get_preset_params("voc21").update(refine=False))
        assert not pipeline_lines()
        for _ in range(2):
            tr.segment(img, "sky, road", get_preset_params("city_scapes").update(refine=False))
    lines = pipeline_lines()
    assert len(lines) == 1 and "\n" not in lines[0] and "load SAM in fp32" in lines[0] and "cos_fac 3" in lines[0]


def test_command_line_keeps_sam_float32_for_city_scapes_in_bf16(small_ckpts, monkeypatch, tmp_path, capsys):
    from PIL import Image

    from trident_core.cli import main

    monkeypatch.setenv(CPU_BF16_ENV, "1")
    img = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(img)
    common = ["segment", str(img), "--classes", "sky, road", "--precision", "bf16", "--device", "cpu",
              "--no-download", "--no-refine", *(f"--{r}={small_ckpts[r]}" for r in ("clip", "dino", "sam"))]
    assert main([*common, "--preset", "city_scapes", "--out", str(tmp_path / "a")]) == 0
    assert "SAM stays fp32" in capsys.readouterr().err
    assert main([*common, "--preset", "voc21", "--out", str(tmp_path / "b")]) == 0
    assert "SAM stays fp32" not in capsys.readouterr().err


def test_bf16_with_city_scapes_float32_sam_is_within_0_01_of_the_reference(full_ckpts, bf16_trident):
    """The golden city_scapes pair: with SAM float32 (as the command line loads it for city_scapes in bf16) every
    class probability is within 0.01 of the reference's float32 (a bfloat16 SAM: 0.071 at worst, the test above)."""
    import json

    from conftest import GOLDEN
    from test_golden import _classes

    from trident_core import Trident
    from trident_core.classify import class_probs, upsample
    from trident_core.models import load_sam
    from trident_core.pipeline import sam_dtype

    case = next(c for c in json.loads((GOLDEN / "cases.json").read_text()) if c["preset"] == "city_scapes")
    params = get_preset_params("city_scapes").update(refine=case["refine"])
    sam = load_sam(full_ckpts["sam"], "cpu", sam_dtype(torch.bfloat16, CPU, params.aggregation))
    tr = Trident(bf16_trident.clip, bf16_trident.dino, sam)
    assert tr.sam.dtype == torch.float32 and tr.clip.dtype == torch.bfloat16
    gold, classes = np.load(GOLDEN / case["golden"]), _classes(case)
    seg = tr.segment(str(GOLDEN / case["image"]), classes, params)
    ref = class_probs(upsample(torch.from_numpy(gold["grid_logits"]), tuple(case["image_size_hw"])), classes,
                      params.classification.logit_scale)
    assert (seg.probs - ref).abs().max() < 0.01
    assert (seg.labels.numpy() == gold["labels"]).mean() >= 0.995


def test_the_converted_copies_kept_are_each_models_most_recently_used(tmp_path):
    """Each new checkpoint content adds a copy: writing one deletes the same model's copies beyond the KEEP (2)
    most recently used and those of other formats, a copy read counts as used, and nothing else in the folder (other
    models' copies, files not named as copies, a folder) is touched."""
    import os

    from safetensors.torch import load_file

    from trident_core.checkpoints import read_state_dict
    from trident_core.models import conversion

    assert conversion.KEEP == 2
    cache = tmp_path / "converted"
    cache.mkdir()
    digest = "{}-{}".format(1234, "{}" * 64)
    old, recent, stale_format, other_model = (cache / f"{role}-{digest.format(*c * 64)}-bfloat16-v{v}"
                                              for role, c, v in (("sam", "a", "2.safetensors"),
                                                                 ("sam", "b", "2.safetensors"), ("sam", "c", "1.pt"),
                                                                 ("clip", "d", "2.safetensors")))
    bystanders = [cache / "sam-notes.pt", cache / "my.txt", other_model]
    for i, f in enumerate([old, recent, stale_format, *bystanders]):
        f.write_bytes(b"x")
        os.utime(f, ns=(10**18 + i, 10**18 + i))  # old < recent < stale_format < ...
    (cache / f"sam-{digest.format(*'e' * 64)}-bfloat16-v2.safetensors").mkdir()

    def convert(seed: int) -> Path:
        path = tmp_path / f"weights{seed}.pth"
        if not path.exists():
            torch.save({"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))}, path)
        conversion.converted(read_state_dict(path), path, "sam", torch.bfloat16, cache=cache)
        return next(f for f in cache.glob("sam-*-v2.safetensors") if f.is_file() and f.stat().st_size > 1
                    and torch.equal(load_file(f)["w"], torch.load(path)["w"].bfloat16()))

    first = convert(1)
    assert not old.exists() and not stale_format.exists() and recent.exists() and first.exists()
    assert all(f.exists() for f in bystanders)
    assert (cache / f"sam-{digest.format(*'e' * 64)}-bfloat16-v2.safetensors").is_dir()
    second = convert(2)
    assert not recent.exists() and first.exists() and second.exists()
    assert convert(1) == first  # read: now the most recently used
    third = convert(3)
    assert first.exists() and third.exists() and not second.exists()
    assert all(f.exists() for f in bystanders)
