"""The kernels package: oneDNN products bit-identical to PyTorch's, the timing probe that decides where they run,
the patches `kernels.apply` installs, and the one switch that turns all of it off."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trident_core import kernels
from trident_core.kernels import clip_attention, exact_linear, timing
from trident_core.kernels.timing import Decision


@pytest.fixture
def force(monkeypatch):
    """Force every timing decision: force(True) runs our kernels, force(False) PyTorch's path."""
    def set_choice(ours: bool) -> None:
        monkeypatch.setattr(timing, "decide", lambda key, contenders: Decision(0.0 if ours else 2.0, 1.0))
        monkeypatch.setattr(timing, "known", lambda key: Decision(0.0 if ours else 2.0, 1.0))
    return set_choice


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SHAPES = [  # (input shape, N): the models' own products, and odd ones
    ((1, 64, 64, 768), 2304), ((4, 442, 768), 3072), ((1000, 3072), 768), ((256, 64), 4096), ((196, 196), 64),
    ((128, 4096), 768), ((3, 50, 70), 40), ((0, 768), 768), ((10, 768), 768),
]


@pytest.mark.parametrize("ours", [True, False])
@pytest.mark.parametrize("shape,n", SHAPES)
def test_linear_is_bit_identical_to_pytorch(shape, n, ours, force):
    force(ours)
    k = shape[-1]
    x, w, bias = _rand(*shape), _rand(n, k, seed=1) / k**0.5, _rand(n, seed=2)
    for b in (bias, None):
        want = F.linear(x, w, b)
        got = exact_linear.linear(x, w, b)
        assert got.shape == want.shape and torch.equal(got, want)
    xt = _rand(*shape[:-1], 2 * k)[..., ::2]  # a strided input (a view of a wider tensor)
    assert torch.equal(exact_linear.linear(xt, w, bias), F.linear(xt, w, bias))


def test_blocked_sum_is_the_sum_of_block_products():
    """The kernel behind `linear`, against a float64 formulation of what it computes."""
    if not exact_linear.available():
        pytest.skip("oneDNN is not available here")
    a, w, bias = _rand(300, 500), _rand(320, 500, seed=1), _rand(320, seed=2)
    cuts = ((0, 192), (192, 384), (384, 500))
    got = exact_linear._blocked(a, w, bias, cuts)
    want = bias.double() + sum(a[:, s:e].double() @ w[:, s:e].double().T for s, e in cuts)
    assert torch.allclose(got.double(), want, atol=1e-4)


def test_onednn_reproduces_this_machines_blas():
    """On the AMD x86 machines this project is measured on, the probe finds MKL's blocks for the models' shapes
    (else `linear` would silently be PyTorch's own: correct, but no faster). Other CPUs may sum differently."""
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    amd = cpuinfo.is_file() and "AuthenticAMD" in cpuinfo.read_text()
    if platform.machine().lower() not in ("x86_64", "amd64") or not exact_linear.available() or not amd:
        pytest.skip("MKL's blocks are known for AMD x86 CPUs only (and oneDNN must be on)")
    found = {(n, k): exact_linear.mkl_blocks(n, k) for n, k in ((2304, 768), (3072, 768), (768, 3072), (4096, 64))}
    assert all(v is not None for v in found.values()), found


def test_one_setting_turns_every_kernel_off(monkeypatch, small_ckpts):
    """TRIDENT_KERNELS=0: no oneDNN product, and a loaded model runs its libraries' own forwards (no patch)."""
    from trident_core.models import load_sam

    a, b = _rand(64, 96), _rand(33, 96, seed=1)
    monkeypatch.setenv(kernels.ENV, "0")
    exact_linear.available.cache_clear()
    exact_linear.mkl_blocks.cache_clear()
    try:
        assert not exact_linear.available() and exact_linear.mkl_blocks(33, 96) is None
        assert torch.equal(exact_linear.linear(a, b), F.linear(a, b))
        assert kernels.apply(nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1))) == {}
        sam = load_sam(small_ckpts["sam"])
        assert not any("forward" in vars(m) for m in sam.model.modules())
    finally:
        monkeypatch.delenv(kernels.ENV)
        exact_linear.available.cache_clear()
        exact_linear.mkl_blocks.cache_clear()
    sam = load_sam(small_ckpts["sam"])
    assert sum("forward" in vars(m) for m in sam.model.modules()) > 0


def _private_timings(folder, monkeypatch) -> list[str]:
    """Timings kept in `folder` on a quiet machine, none in memory; returns a log for `_slow_and_fast`."""
    monkeypatch.setenv("TRIDENT_CACHE", str(folder))
    monkeypatch.setattr(timing, "quiet", lambda since: True)
    monkeypatch.setattr(timing, "JUDGE_AFTER_S", 0.0)
    timing.forget()
    return []


def _slow_and_fast(log: list[str]):
    """Two contenders that log their calls and return their names; the slow one sleeps 3 ms."""
    def slow() -> str:
        log.append("slow")
        time.sleep(0.003)
        return "slow"

    def fast() -> str:
        log.append("fast")
        return "fast"

    return slow, fast


def test_timing_probe_keeps_the_faster_path_and_remembers_it(tmp_path, monkeypatch):
    """The first decision for a key times both contenders; the faster wins; later processes read it from disk
    without timing again (unless it was timed on a busy machine); the report counts the work run through it."""
    calls = _private_timings(tmp_path, monkeypatch)
    slow, fast = _slow_and_fast(calls)
    try:
        d = timing.decide("test key", lambda: (fast, slow))
        assert d.use_ours and d.ours_ms < d.torch_ms
        assert calls.count("fast") == calls.count("slow") == 2  # warm-up and one run: clearly slower, no more
        d.work += 10
        assert d.saved_s == pytest.approx(10 * (d.torch_ms - d.ours_ms) / 1000)
        other = timing.decide("other key", lambda: (slow, fast))
        assert not other.use_ours and other.saved_s == 0
        timing.forget()  # a new process: decisions come from the file, nothing is timed
        calls.clear()
        again = timing.decide("test key", lambda: pytest.fail("timed again"))
        assert again.use_ours and calls == []
        assert {r["key"] for r in timing.report()} == {"test key", "other key"}
        monkeypatch.setattr(timing, "quiet", lambda since: False)  # a busy machine
        timing.decide("busy key", lambda: (fast, slow))
        monkeypatch.setattr(timing, "quiet", lambda since: True)
        timing.decide("quiet key", lambda: (fast, slow))  # a later quiet stretch does not keep the busy one
        timing.forget()
        assert {r["key"] for r in timing.report()} == {"test key", "other key", "quiet key"}
    finally:
        timing.forget()


@pytest.mark.parametrize("content", ['{"k": ' * 4000 + "1" + "}" * 4000, '{"k": {"ours_ms": 1e999, "torch_ms": 1}}',
                                     '{"k": {"ours_ms": ' + "9" * 400 + ', "torch_ms": 1}}', "[]", "folder"])
def test_a_damaged_or_misplaced_timings_file_is_timed_again_not_a_crash(tmp_path, monkeypatch, content, caplog):
    from trident_core import caches

    calls = _private_timings(tmp_path, monkeypatch)
    slow, fast = _slow_and_fast(calls)
    path = timing._cache_file()
    if content == "folder":  # a folder where the file belongs: read as a miss, written nowhere
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True)
        path.write_text(content)
    caches.forget()
    monkeypatch.setattr(timing, "quiet", lambda since: True)
    try:
        with caplog.at_level("WARNING", logger="trident_core.cache"):
            assert timing.decide("k", lambda: (fast, slow)).use_ours
            timing.flush()
        assert calls  # timed, not taken from the damaged file
        assert any("kernel timings" in r.getMessage() for r in caplog.records)
    finally:
        timing.forget()


def test_timings_are_kept_once_their_stretch_is_judged(tmp_path, monkeypatch):
    """A timing is judged over at least JUDGE_AFTER_S (the CPU clocks tick every 10 ms): until then nothing is
    written; a later product's lookup writes it."""
    calls = _private_timings(tmp_path, monkeypatch)
    monkeypatch.setattr(timing, "JUDGE_AFTER_S", 1.0)
    slow, fast = _slow_and_fast(calls)
    files = lambda: list((tmp_path / "kernels").glob("timings-*.json"))  # noqa: E731
    try:
        timing.decide("key", lambda: (fast, slow))
        assert files() == [] and timing.known("key") is not None  # too short a stretch to judge yet
        time.sleep(1.05)
        timing.known("anything")
        assert len(files()) == 1 and "key" in files()[0].read_text()
        timing.decide("last key", lambda: (fast, slow))  # timed last in a process: kept when the command ends
        assert "last key" not in files()[0].read_text()
        timing.flush()
        assert "last key" in files()[0].read_text()
    finally:
        timing.forget()


def test_another_busy_process_makes_timings_untrusted():
    """The CPU clocks see another process keeping a core busy; this process's own work is not counted."""
    if timing.usage().all_cpu is None:
        pytest.skip("no /proc/stat here")
    mine = timing.Usage(wall=10.0, all_cpu=100.0, own_cpu=50.0)
    assert timing.others_cores(mine, timing.Usage(12.0, 104.0, 54.0)) == 0.0  # two cores, all of them ours
    assert timing.others_cores(mine, timing.Usage(12.0, 105.0, 53.0)) == 1.0  # 2 s of others' CPU in 2 s
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        start = timing.usage()
        time.sleep(1.2)
        assert timing.others_cores(start, timing.usage()) > 0.7
        assert not timing.quiet(start)
    finally:
        spinner.kill()
        spinner.wait()


def test_an_undecided_shape_is_timed_on_its_real_calls(tmp_path, monkeypatch):
    """Until decided, a call runs both ways and returns PyTorch's result; a warm-up and then timed calls decide,
    sooner when one way is clearly slower."""
    ran = _private_timings(tmp_path, monkeypatch)
    slow, fast = _slow_and_fast(ran)
    try:
        assert timing.trial("k", slow, fast) == "fast" and timing.known("k") is None  # the warm-up
        assert timing.trial("k", slow, fast) == "fast"  # timed: clearly slower, decided at once
        d = timing.known("k")
        assert d is not None and not d.use_ours and ran == ["slow", "fast"] * 2
        for _ in range(1 + timing.REPEATS):  # close contenders: decided after REPEATS timed calls
            timing.trial("close", fast, fast)
        assert timing.known("close") is not None
        timing.forget()
        assert timing.known("k") is not None  # kept on disk
    finally:
        timing.forget()


def test_linear_follows_the_timing_decision(force, monkeypatch):
    """Where PyTorch's path was measured faster, the blocked oneDNN kernel is never called."""
    if not exact_linear.available():
        pytest.skip("oneDNN is not available here")
    if exact_linear.mkl_blocks(2304, 768) is None:  # (the exactness probe runs the kernel itself, once)
        pytest.skip("no oneDNN blocking reproduces this machine's BLAS")
    used = []
    real = exact_linear._blocked
    monkeypatch.setattr(exact_linear, "_blocked", lambda *a: used.append(1) or real(*a))
    x, w = _rand(512, 768), _rand(2304, 768, seed=1)
    force(False)
    exact_linear.linear(x, w)
    assert used == []
    force(True)
    exact_linear.linear(x, w)
    assert used


def test_gradients_and_other_dtypes_keep_pytorchs_path():
    w = _rand(8, 16, seed=1).requires_grad_()
    x = _rand(4, 16)
    exact_linear.linear(x, w).sum().backward()  # autograd through F.linear
    assert torch.allclose(w.grad, x.sum(0).expand(8, 16))
    xd, wd = x.double(), w.detach().double()
    assert torch.equal(exact_linear.linear(xd, wd), F.linear(xd, wd))


def _plain(module: nn.Module) -> nn.Module:
    """A float64 copy running the modules' own forwards."""
    out = copy.deepcopy(module).double()
    for mod in out.modules():
        mod.__dict__.pop("forward", None)
    return out


@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_self_attention_adapter_equals_multihead_attention(mask, force):
    force(True)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    clip_attention.use_fast_self_attention(mha)
    x = _rand(3, 17, 64)
    m = None
    if mask == "float":
        m = torch.full((17, 17), float("-inf")).triu(1)  # CLIP's causal text mask
    elif mask == "bool":
        m = torch.ones(17, 17, dtype=torch.bool).triu(1)  # True: masked out
    ref = _plain(mha)
    with torch.no_grad():
        want = ref(x.double(), x.double(), x.double(), need_weights=False,
                   attn_mask=None if m is None else m if m.dtype == torch.bool else m.double())[0]
        got, weights = mha(x, x, x, need_weights=False, attn_mask=m)
    assert weights is None and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()


def test_self_attention_adapter_leaves_other_calls_to_pytorch():
    mha = nn.MultiheadAttention(32, 2, batch_first=True).eval()
    clip_attention.use_fast_self_attention(mha)
    x, y = _rand(2, 5, 32), _rand(2, 7, 32, seed=1)
    with torch.no_grad():
        out, weights = mha(x, x, x, need_weights=True)  # attention weights asked for
        assert weights.shape == (2, 5, 5)
        cross, _ = mha(x, y, y, need_weights=False)  # not self-attention
        want = nn.MultiheadAttention.forward(mha, x, y, y, need_weights=False)[0]
    assert torch.allclose(cross, want, atol=1e-6)


def test_apply_patches_what_fits_and_keeps_values():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    counts = kernels.apply(model)
    assert counts == {"exact_linear": 2, "clip_attention": 0, "sam_attention": 0, "gelu": 0}
    assert all("forward" in m.__dict__ for m in model if isinstance(m, nn.Linear))
    x = _rand(10, 16)
    with torch.no_grad():
        assert torch.equal(model(x), _plain(model).float()(x))


def test_full_size_sam_and_dino_are_bit_identical_to_the_libraries(full_trident, photo):
    """Full-size SAM ViT-B and DINO ViT-B/16 (whose outputs pass the method's thresholds): what the loaders'
    oneDNN routing computes equals, bit for bit, the libraries' own modules on PyTorch's kernels."""
    from segment_anything.utils.transforms import ResizeLongestSide

    from trident_core.image import round_up_to

    if full_trident.sam.device.type != "cpu":
        pytest.skip("the CPU path")
    sam, dino = full_trident.sam, full_trident.dino
    img = round_up_to(photo[:, :400], 16)
    enc = sam.encode(img)
    plain_sam = _plain(sam.model).float()
    seen = {}
    hook = plain_sam.image_encoder.blocks[-1].attn.qkv.register_forward_hook(lambda _m, _i, o: seen.update(qkv=o))
    x = torch.as_tensor(ResizeLongestSide(1024).apply_image(img)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        embedding = plain_sam.image_encoder(plain_sam.preprocess(x))
    hook.remove()
    b, h, w, _ = seen["qkv"].shape
    q, k, v = seen["qkv"].reshape(b, h * w, 3, 12, -1).permute(2, 0, 3, 1, 4).reshape(3, 12, h * w, -1)
    assert torch.equal(enc.q, q) and torch.equal(enc.k, k) and torch.equal(enc.v, v)
    assert torch.equal(sam.image_embedding(enc), embedding)  # the encoder finished for the mask decoder

    windows = _rand(4, 3, 336, 336)
    plain_dino = dataclasses.replace(dino, model=_plain(dino.model).float())
    assert torch.equal(dino.patch_tokens(windows), plain_dino.patch_tokens(windows))


def test_quick_gelu_in_place_equals_open_clip_and_patches_clip_mlps():
    """open_clip's QuickGELU computed in its input's memory gives its own values bit for bit, and `apply` gives it
    to every block's MLP of a CLIP (image and text towers), nowhere else."""
    import open_clip
    from open_clip.transformer import QuickGELU

    from trident_core.kernels.gelu import _quick_gelu_forward_in_place

    for shape in [(8, 442, 3072), (3, 7), (1000,)]:
        x = _rand(*shape) * 3
        want = QuickGELU()(x)
        fresh = x.clone()
        got = _quick_gelu_forward_in_place(QuickGELU(), fresh)
        assert torch.equal(got, want) and got.data_ptr() == fresh.data_ptr()
    model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=2,
                                                          head_width=64),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
                           quick_gelu=True).eval()
    assert kernels.apply(model)["gelu"] == 3  # two image blocks, one text block
    plain = copy.deepcopy(model)  # the other tricks kept, QuickGELU's own forward back
    for mod in plain.modules():
        if isinstance(mod, QuickGELU):
            mod.__dict__.pop("forward")
    img, text = _rand(2, 3, 64, 64), open_clip.tokenize(["a horse", "grass"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(img), plain.encode_image(img))
        assert torch.equal(model.encode_text(text), plain.encode_text(text))
