"""Installing next to another OpenCV: no requirement names an OpenCV distribution, and install.py adds
opencv-python only where no cv2 is importable (two distributions of cv2 overwrite each other's files)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPENCV = re.compile(r"^\s*opencv", re.I)


def _install_module():
    spec = importlib.util.spec_from_file_location("trident_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_hard_opencv_requirement():
    reqs = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert not [r for r in reqs if OPENCV.match(r)]
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [d for d in project["dependencies"] if OPENCV.match(d)]
    assert project["optional-dependencies"]["opencv"] == ["opencv-python>=4.8"]


def test_install_py_keeps_an_existing_cv2(monkeypatch):
    install = _install_module()
    calls = []
    monkeypatch.setattr(install.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name: object())
    assert install.main() == 0 and calls == []
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name: None)
    assert install.main() == 0
    assert calls == [[sys.executable, "-m", "pip", "install", "opencv-python>=4.8"]]


def test_wheel_holds_every_module_and_class_file(tmp_path):
    """A plain (non-editable) install gets every module of trident_core and its class lists: the wheel is built
    from this tree and its file list compared with the files of the tree."""
    pytest.importorskip("setuptools")
    import shutil
    import subprocess
    import zipfile

    src = tmp_path / "src"  # a copy: a stale build/ folder in the checkout would hide a missing package
    shutil.copytree(ROOT / "trident_core", src / "trident_core", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"cannot build a wheel here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "trident_core").rglob("*")
                if p.suffix in (".py", ".txt") and "__pycache__" not in p.parts}
    assert expected - names == set()
