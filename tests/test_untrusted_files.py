"""Hostile model files: a TorchScript archive whose code writes a file is refused by every loader (library, CLI,
ComfyUI nodes) with one line, and its code never runs; OpenAI-style TorchScript CLIP weights read as jit would."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_nodes import core, run

from trident_core import Trident
from trident_core.checkpoints import CheckpointError, read_state_dict
from trident_core.cli import main
from trident_core.models import load_clip, load_dino, load_sam


class _Evil(torch.nn.Module):
    """A scripted module whose `__setstate__` (run by torch.jit.load) creates and writes the file `target`."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.target, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.w = state[1]
        self.training = state[2]
        written = torch.from_file(self.target, True, 4, dtype=torch.uint8)
        written.fill_(65)
        self.w = self.w + written.sum().float() * 0.0


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> tuple[Path, Path]:
    """(the hostile archive, the file its code would write)."""
    root = tmp_path_factory.mktemp("evil")
    target = root / "pwned"
    path = root / "evil.pt"
    torch.jit.script(_Evil(str(target))).save(str(path))
    assert not target.exists()
    return path, target


def _one_line(message: str, path: Path) -> None:
    assert "\n" not in message.strip() and str(path) in message and "refused" in message, message


def test_the_hostile_archive_does_run_code_under_torch_jit_load(evil, tmp_path):
    """The probe is real: loading it the way TorchScript loads writes the file."""
    path, _ = evil
    target = tmp_path / "written_by_jit"
    torch.jit.script(_Evil(str(target))).save(str(tmp_path / "e.pt"))
    torch.jit.load(str(tmp_path / "e.pt"))
    assert target.read_bytes() == b"AAAA"


@pytest.mark.parametrize("loader", [read_state_dict, load_clip, load_dino, load_sam])
def test_library_loaders_refuse_without_running_code(evil, loader):
    path, target = evil
    with pytest.raises(CheckpointError) as e:
        loader(path)
    _one_line(str(e.value), path)
    assert not target.exists()


def test_trident_from_files_refuses(evil, small_ckpts):
    path, target = evil
    with pytest.raises(CheckpointError) as e:
        Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], path, device="cpu")
    _one_line(str(e.value), path)
    assert not target.exists()


@pytest.mark.parametrize("role", ["clip", "dino", "sam"])
def test_cli_refuses(evil, small_ckpts, tmp_path, capsys, role):
    path, target = evil
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    files = {r: str(small_ckpts[r]) for r in ("clip", "dino", "sam")} | {role: str(path)}
    rc = main(["segment", str(tmp_path / "x.png"), "--classes", "a, b", "--out", str(tmp_path / "out"),
               *(x for r, f in files.items() for x in (f"--{r}", f))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    _one_line(err[0], path)
    assert not target.exists()


class _Shell:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_cli_refuses_a_plain_pickle_in_one_line(small_ckpts, tmp_path):
    """A pickle (protocol 4) whose loading would run a command, as the command line sees it in a real process
    (PyTorch's warnings included): one error line, nothing run."""
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"w": _Shell()}, protocol=4))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    r = subprocess.run([sys.executable, "-m", "trident_core", "segment", str(tmp_path / "x.png"), "--classes", "a, b",
                        "--out", str(tmp_path / "out"), "--clip", str(small_ckpts["clip"]), "--dino",
                        str(small_ckpts["dino"]), "--sam", str(path), "--no-download"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), r.stderr
    _one_line(err[0], path)
    assert "weights_only` set to `False`" not in err[0] and "Unsupported" in err[0]  # no advice to load it anyway
    assert not (tmp_path / "pwned_by_pickle").exists()


@pytest.mark.parametrize("node, folder", [("TridentLoadCLIP", "open_clip"), ("TridentLoadDINO", "dino"),
                                          ("TridentLoadSAM", "sams")])
def test_loader_nodes_refuse(evil, tmp_path, monkeypatch, node, folder):
    path, target = evil
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "evil.pt").symlink_to(path)
    monkeypatch.setenv("TRIDENT_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("TRIDENT_NO_DOWNLOAD", "1")
    with pytest.raises(core("checkpoints").CheckpointError) as e:
        run(node, model_name="evil.pt", precision="fp32", allow_download=False)
    _one_line(str(e.value), tmp_path / folder / "evil.pt")
    assert not target.exists()


class _Touch:
    """Pickles as a call of Path.touch: what a hostile data.pkl would hold."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_torchscript_archive_with_a_hostile_pickle_is_refused(tmp_path):
    import pickle
    import zipfile

    target = tmp_path / "pwned"
    path = tmp_path / "ViT-B-16.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data.pkl", pickle.dumps({"visual.conv1.weight": _Touch(target)}, protocol=2))
        zf.writestr("m/constants.pkl", pickle.dumps(()))
        zf.writestr("m/code/__torch__.py", "")
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    _one_line(str(e.value), path)
    assert not target.exists() and "which a weights file never needs" in str(e.value)


@pytest.mark.parametrize(("text", "said"), [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:4b7e\nsize 598583303\n", "a Git LFS pointer"),
    (b"<!DOCTYPE html>\n<html><body>Rate limit exceeded</body></html>", "a web page or an error message"),
    (b'{"error": "Repository not found"}', "a web page or an error message")])
def test_text_where_a_checkpoint_should_be_is_named_for_what_it_is(tmp_path, text, said):
    """A Git LFS pointer (after cloning a model repository without LFS) or a saved error page was reported as a
    file of "pickled Python objects" refused for safety."""
    from trident_core.checkpoints import CheckpointError, read_state_dict

    for name in ("model.safetensors", "model.pth"):
        (tmp_path / name).write_bytes(text)
        with pytest.raises(CheckpointError, match=said) as e:
            read_state_dict(tmp_path / name)
        assert "pickled" not in str(e.value)
