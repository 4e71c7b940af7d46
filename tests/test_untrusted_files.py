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
    err = [ln for ln in r.stderr.strip().splitlines() if "matches none of open_clip's" not in ln]  # (small CLIP)
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), r.stderr
    _one_line(err[0], path)
    assert "weights_only" not in err[-1].split("(weights_only=True)")[1] and "(operand 149)" in err[-1]
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


class _Namespace:
    """Pickles as an argparse.Namespace (what a training script's checkpoint often holds beside its weights)."""

    def __reduce__(self):
        import argparse

        return (argparse.Namespace, ())


@pytest.mark.parametrize(("obj", "named"), [(_Shell(), "posix.system"), (_Namespace(), "argparse.Namespace")])
def test_a_refused_pickle_names_what_it_holds_without_advice_to_load_it_anyway(tmp_path, obj, named):
    """PyTorch's own message (quoted before) advised loading with weights_only=False and held terminal codes."""
    path = tmp_path / "model.pth"
    torch.save({"w": obj, "x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    message = str(e.value)
    assert message.endswith(f"(it refers to {named})") and "\x1b" not in message and "\n" not in message
    assert "set to `False`" not in message and "two options" not in message


def _scripted_archive(tmp_path: Path) -> Path:
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.script(torch.nn.Linear(4, 3)).save(str(path))
    return path


def _rewrite(path: Path, change) -> None:
    """The archive with each record passed through change(info, data) -> (data, compress_type)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        records = [(info, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in records:
            data, kind = change(info, data)
            zf.writestr(info.filename, data, compress_type=kind)


def test_a_torchscript_record_that_unpacks_to_gigabytes_is_refused_unread(tmp_path):
    """A 2 MB archive whose weight record was a deflated run of zeros took 4.6 GB of memory to be read."""
    import resource
    import zipfile

    path = _scripted_archive(tmp_path)
    _rewrite(path, lambda info, data: (bytes(1 << 30), zipfile.ZIP_DEFLATED) if "/data/0" in info.filename
             else (data, zipfile.ZIP_STORED))
    assert path.stat().st_size < 4 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="is compressed, which PyTorch never writes"):
        read_state_dict(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # KB: nothing unpacked


def test_a_torchscript_record_of_another_size_than_its_tensor_is_refused(tmp_path):
    import zipfile

    path = _scripted_archive(tmp_path)
    assert set(read_state_dict(path)) == {"weight", "bias"}
    _rewrite(path, lambda info, data: (data + bytes(4096) if "/data/0" in info.filename else data,
                                       zipfile.ZIP_STORED))
    with pytest.raises(CheckpointError, match="holds 4144 bytes, not the 12 elements its tensor names"):
        read_state_dict(path)


def test_a_folder_given_as_a_model_file_is_named_a_folder(small_ckpts, tmp_path, capsys):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    code = main(["segment", str(tmp_path / "x.png"), "--classes", "a, b", "--out", str(tmp_path / "out"),
                 "--clip", str(small_ckpts["clip"].parent), "--dino", str(small_ckpts["dino"]), "--no-download"])
    err = capsys.readouterr().err.strip().splitlines()
    folder = small_ckpts["clip"].parent
    assert code == 2 and err == [f"error: --clip {folder} is a folder: give the checkpoint file in it (e.g. "
                                 f"{folder / 'ViT-B-16_openai_open_clip_model.safetensors'})"]


def test_the_command_without_opencv_says_how_to_install_it(tmp_path):
    """A plain pip install (OpenCV is an extra) gave a 17-line traceback ending in `import cv2`, even for --help."""
    (tmp_path / "cv2.py").write_text("raise ModuleNotFoundError(\"No module named 'cv2'\", name='cv2')\n")
    blocker = tmp_path / "sitecustomize.py"  # (find_spec must not see the installed OpenCV either)
    blocker.write_text("import sys\nsys.modules['cv2'] = None\n")
    r = subprocess.run([sys.executable, "-m", "trident_core", "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path),
                                                                         str(Path(__file__).resolve().parents[1])])})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        'error: Trident needs OpenCV: pip install "trident-seg[opencv]" (or an OpenCV you have already, e.g. '
        "opencv-python-headless)"], r.stderr


def test_the_lazy_package_still_gives_its_submodules_and_lists_its_names():
    """Importing the public names on first use lost `trident_core.pipeline` (no import of it ran) and dir()'s names."""
    code = ("import trident_core as t, sys; assert 'trident_core.pipeline' not in sys.modules; "
            "print(t.pipeline.Trident is t.Trident, 'Trident' in dir(t), hasattr(t, 'nope'), hasattr(t, '_x'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and r.stdout.split() == ["True", "True", "False", "False"], r.stderr


def test_the_command_shows_logged_warnings_as_warning_lines(small_ckpts, tmp_path):
    """A logged warning (here: the small test CLIP matches no open_clip config) reached the terminal as a bare line,
    unlike the command's own "warning: ..." and "error: ..." lines."""
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "x.png")
    r = subprocess.run([sys.executable, "-m", "trident_core", "segment", str(tmp_path / "x.png"), "--classes", "a, b",
                        "--out", str(tmp_path / "out"), "--device", "cpu", "--no-download", "--no-refine",
                        *(f"--{role}={small_ckpts[role]}" for role in ("clip", "dino", "sam"))],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "TRIDENT_CACHE": str(tmp_path / "cache")})
    (line,) = [ln for ln in r.stderr.splitlines() if "matches none of open_clip" in ln]
    assert r.returncode == 0 and line.startswith("warning: CLIP "), r.stderr
