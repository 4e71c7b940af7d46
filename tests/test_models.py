"""Loaders: every official file form, architecture read off the tensors, the large (patch-14) configuration."""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch

from trident_core import Params, Trident
from trident_core.models import load_clip, load_dino, load_sam


def test_openai_torchscript_clip_loads_like_the_state_dict(small_ckpts, tmp_path):
    ref = load_clip(small_ckpts["clip"])
    plain = copy.deepcopy(ref.model)
    for mod in plain.modules():  # the modules' own forwards (the loader gives some the oneDNN one)
        mod.__dict__.pop("forward", None)
    traced = torch.jit.trace(plain.visual, torch.zeros(1, 3, 224, 224))
    holder = torch.jit.script(_Holder(traced, plain))
    path = tmp_path / "ViT-B-16.pt"
    holder.save(str(path))
    from trident_core.checkpoints import read_state_dict

    sd = read_state_dict(path)
    assert set(sd) - {"attn_mask", "input_resolution"} == set(ref.model.state_dict())
    got = load_clip(path)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(got.model.state_dict()[k], v), k


class _Holder(torch.nn.Module):
    """A TorchScript archive with the open_clip/OpenAI key layout (what OpenAI's ViT-B-16.pt holds)."""

    def __init__(self, visual, model):
        super().__init__()
        self.visual = visual
        self.transformer = model.transformer
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.logit_scale = model.logit_scale
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.register_buffer("input_resolution", torch.tensor(224))
        self.note = torch.zeros(3)  # a plain tensor attribute: not in state_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x) + self.note.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torchscript_weights_read_as_torch_jit_reads_them(small_ckpts, tmp_path, dtype):
    """Keys, order, dtypes and values equal `torch.jit.load(...).state_dict()` on an archive made here (fp16 as
    OpenAI's file; traced modules, whose classes are name-mangled, inside a scripted one), read without jit."""
    from trident_core.checkpoints import read_state_dict

    plain = copy.deepcopy(load_clip(small_ckpts["clip"]).model)
    for mod in plain.modules():
        mod.__dict__.pop("forward", None)
    traced = torch.jit.trace(plain.visual, torch.zeros(1, 3, 224, 224))
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.script(_Holder(traced, plain)).to(dtype).save(str(path))
    ours = read_state_dict(path)
    theirs = torch.jit.load(str(path)).state_dict()
    assert list(ours) == list(theirs) and "input_resolution" in ours and "note" not in ours
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype == (dtype if v.is_floating_point() else v.dtype), k
        assert ours[k].shape == v.shape and torch.equal(ours[k], v), k


def test_architectures_are_read_off_the_files(small_ckpts):
    clip, dino, sam = load_clip(small_ckpts["clip"]), load_dino(small_ckpts["dino"]), load_sam(small_ckpts["sam"])
    assert clip.patch_size == 16 and clip.model.visual.transformer.width == 64
    assert dino.patch_size == 16 and len(dino.model.blocks) == 2 and dino.model.embed_dim == 64
    assert sam.num_heads == 1 and len(sam.model.image_encoder.blocks) == 2
    assert sam.model.image_encoder.blocks[1].window_size == 0 and sam.model.image_encoder.blocks[0].window_size == 14


def test_a_clip_of_no_known_config_says_its_head_width_is_a_guess(small_ckpts, tmp_path, caplog):
    """Heads are not in a checkpoint's tensors: a CLIP matching none of open_clip's configs runs 64-wide heads,
    which it now says; a known architecture says nothing."""
    with caplog.at_level("WARNING", logger="trident_core.models.clip"):
        load_clip(small_ckpts["clip"])
    assert "matches none of open_clip's model configs: its attention heads are taken as 64 wide" in caplog.text
    caplog.clear()
    torch.save(open_clip.create_model("ViT-B-32-quickgelu").state_dict(), tmp_path / "b32.bin")
    with caplog.at_level("WARNING", logger="trident_core.models.clip"):
        load_clip(tmp_path / "b32.bin")
    assert "matches none" not in caplog.text


def test_a_resnet_clip_is_named_and_another_layout_is_not_called_resnet(tmp_path):
    from trident_core.checkpoints import CheckpointError

    sd = open_clip.create_model("RN50").state_dict()
    torch.save(sd, tmp_path / "rn50.bin")
    with pytest.raises(CheckpointError, match="only ViT CLIP models are supported .*has a ResNet image tower"):
        load_clip(tmp_path / "rn50.bin")
    torch.save({k: v for k, v in sd.items() if not k.startswith("visual.layer")}, tmp_path / "odd.bin")
    with pytest.raises(CheckpointError, match="only ViT CLIP models are supported .*has no ViT image tower"):
        load_clip(tmp_path / "odd.bin")


def test_known_openai_architecture_gets_quickgelu(tmp_path):
    sd = open_clip.create_model("ViT-B-32-quickgelu").state_dict()
    torch.save(sd, tmp_path / "b32.bin")
    m = load_clip(tmp_path / "b32.bin")
    assert m.arch == "ViT-B-32" and m.quick_gelu
    assert type(m.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert not load_clip(tmp_path / "b32.bin", quick_gelu=False).quick_gelu


def test_patch14_clip_with_dino16_runs_end_to_end(small_ckpts, tmp_path, photo):
    """The large configuration's shape logic (CLIP patch 14: 24x24 tokens per window, DINO 21x21) on a small
    patch-14 CLIP: multiples of 14 in S0/S2, V resized to DINO's grid and back."""
    m = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=224, patch_size=14, width=64, layers=2, head_width=64),
                       text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
    torch.save(m.state_dict(), tmp_path / "clip14.bin")
    tr = Trident.from_files(tmp_path / "clip14.bin", small_ckpts["dino"], small_ckpts["sam"], device="cpu")
    assert tr.clip.patch_size == 14 and not tr.clip.quick_gelu
    from trident_core.config import WindowConfig
    from trident_core.pipeline import compute_window_features

    wf = compute_window_features(tr.clip, tr.dino, photo[:300, :500], WindowConfig())
    assert wf.token_grid == (24, 24) and wf.tokens.shape[1] == 576
    assert all(v % 14 == 0 for box in wf.plan.boxes for v in box)
    seg = tr.segment(photo[:300, :500], "sky, person", Params(refine=True))
    assert tuple(seg.labels.shape) == (300, 500) and np.isfinite(seg.probs.numpy()).all()


def test_format_is_read_from_the_content_not_the_name(small_ckpts, tmp_path):
    """A safetensors file saved under another name (.bin) and a torch file named .safetensors both load."""
    (tmp_path / "a.bin").write_bytes(small_ckpts["clip"].read_bytes())
    (tmp_path / "b.safetensors").write_bytes(small_ckpts["clip_bin"].read_bytes())
    a, b = load_clip(tmp_path / "a.bin"), load_clip(tmp_path / "b.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_models_are_built_without_random_initialisation(small_ckpts, monkeypatch):
    """No initialiser touches a real tensor while the three loaders build their models (the checkpoint's tensors
    are assigned instead), and every parameter and buffer, the rebuilt non-persistent ones included, equals what
    the architectures' own constructors plus load_state_dict give."""
    import timm.layers
    from segment_anything.build_sam import _build_sam

    from trident_core.checkpoints import read_state_dict

    touched = []

    def spy(fn):
        def wrapped(tensor, *a, **k):
            if not tensor.is_meta:
                touched.append(tuple(tensor.shape))
            return fn(tensor, *a, **k)
        return wrapped

    for mod, name in [(torch.nn.init, n) for n in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_",
                                                   "zeros_", "ones_", "constant_")] + [(timm.layers, "trunc_normal_")]:
        monkeypatch.setattr(mod, name, spy(getattr(mod, name)))
    clip, dino, sam = load_clip(small_ckpts["clip"]), load_dino(small_ckpts["dino"]), load_sam(small_ckpts["sam"])
    assert touched == []
    monkeypatch.undo()

    ref_clip = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=224, patch_size=16, width=64, layers=2,
                                                            head_width=64),
                              text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
                              quick_gelu=True)
    ref_sam = _build_sam(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=1,
                         encoder_global_attn_indexes=[1], checkpoint=None)
    for ours, ref, path in ((clip.model, ref_clip, small_ckpts["clip"]), (sam.model, ref_sam, small_ckpts["sam"])):
        ref.load_state_dict(read_state_dict(path))
        want = dict(ref.named_buffers()) | dict(ref.named_parameters())
        got = dict(ours.named_buffers()) | dict(ours.named_parameters())
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert not any(t.is_meta for t in (*dino.model.parameters(), *dino.model.buffers()))


def test_the_small_test_checkpoints_are_the_same_in_every_process(tmp_path):
    """Every tensor of the tests' small checkpoints, buffers included (SAM's random Fourier features are drawn when
    the model is built), comes from a fixed seed: another process writes the same files."""
    import subprocess
    import sys
    from pathlib import Path

    from factory import write_small_checkpoints

    tests = Path(__file__).parent
    here = write_small_checkpoints(tmp_path / "here")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; import torch; torch.manual_seed(7);"
            " from factory import write_small_checkpoints; write_small_checkpoints(Path(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(tests), str(tmp_path / "there")], check=True)
    for role in ("dino", "sam"):
        a, b = torch.load(here[role], weights_only=True), torch.load(tmp_path / "there" / here[role].name,
                                                                      weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role


@pytest.mark.parametrize("wrap", ["teacher", "student", "alone"])
def test_dinos_training_checkpoints_load_their_backbone(small_ckpts, tmp_path, wrap):
    """DINO's training checkpoint holds teacher and student, each `backbone.*` beside its projection `head.*`
    (the student's under DDP's `module.`): refused before as "matches no known model" or "holds no tensors"."""
    plain = torch.load(small_ckpts["dino"], weights_only=True)
    head = {"head.mlp.0.weight": torch.randn(8, 64), "head.last_layer.weight_g": torch.ones(16, 1)}
    teacher = {**{f"backbone.{k}": v for k, v in plain.items()}, **head}
    student = {f"module.{k}": v.clone() for k, v in teacher.items()}
    obj = {"teacher": teacher, "student": student, "epoch": 100} if wrap == "teacher" else (
        {"student": student, "epoch": 3} if wrap == "student" else teacher)
    path = tmp_path / "checkpoint.pth"
    torch.save(obj, path)
    got = load_dino(path).model.state_dict()
    want = load_dino(small_ckpts["dino"]).model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(("role", "drop"), [
    ("clip", "text_projection"), ("dino", "pos_embed"), ("dino", "blocks.0.mlp.fc1.weight"),
    ("sam", "image_encoder.blocks.1.attn.rel_pos_h")])
def test_a_checkpoint_missing_a_tensor_its_shape_is_read_from_is_one_line(small_ckpts, tmp_path, role, drop):
    """A bare KeyError before (the shape is read off the file before the strict load names what is missing)."""
    from safetensors.torch import load_file, save_file

    from trident_core.checkpoints import CheckpointError

    src = small_ckpts[role]
    sd = load_file(str(src)) if src.suffix == ".safetensors" else torch.load(src, weights_only=True)
    assert drop in sd
    sd.pop(drop)
    path = tmp_path / f"{role}.safetensors"
    save_file(sd, str(path))
    loader = {"clip": load_clip, "dino": load_dino, "sam": load_sam}[role]
    with pytest.raises(CheckpointError, match=f"lacks the tensor '{drop}' of a .* checkpoint: is the file complete"):
        loader(path)


@pytest.mark.parametrize(("name", "quick"), [
    ("ViT-B-16_openai_open_clip_model.safetensors", True),  # the pack's own download
    ("ViT-B-16_laion2b_s34b_b88k.safetensors", False),  # trained with GELU: it ran with QuickGELU
    ("laion/CLIP-ViT-B-16-laion2B-s34B-b88K/open_clip_model.safetensors", False),  # Hugging Face's folder says it
    ("ViT-B-32-quickgelu_laion400m_e32.safetensors", True),  # open_clip's -quickgelu LAION models
    ("ViT-H-14-378-quickgelu_dfn5b.safetensors", True), ("metaclip_fullcc/open_clip_model.safetensors", True),
    ("datacomp_xl_s13b_b90k.safetensors", False), ("my_clip.safetensors", True)])  # nothing said: by architecture
def test_the_activation_follows_what_the_files_name_says_of_its_training(name, quick):
    """QuickGELU was chosen by architecture alone: every ViT-B-16 (LAION's too) ran with it, every ViT-H-14 (DFN's,
    MetaCLIP's QuickGELU ones too) without. Here for a ViT-B-16 (an architecture OpenAI released)."""
    from trident_core.models.clip import trained_with_quick_gelu

    assert trained_with_quick_gelu(f"/models/open_clip/{name}", "ViT-B-16") is quick


def test_the_loaded_clip_runs_the_activation_its_name_says(small_ckpts, tmp_path):
    for name, quick in (("tiny_laion2b.safetensors", False), ("tiny-quickgelu.safetensors", True),
                        ("tiny.safetensors", False)):  # (not an OpenAI architecture: GELU)
        (tmp_path / name).symlink_to(small_ckpts["clip"])
        clip = load_clip(tmp_path / name)
        assert clip.quick_gelu is quick
        assert (type(clip.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU") is quick
        assert load_clip(tmp_path / name, quick_gelu=not quick).quick_gelu is not quick  # the library's override
