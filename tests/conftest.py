"""Shared fixtures: small random-weight checkpoints, the full-size portable checkpoints of ../shared, images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from factory import write_small_checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRIDENT_SHARED", ROOT.parent / "shared"))
GOLDEN = SHARED / "reference-golden"


@pytest.fixture(scope="session")
def small_ckpts(tmp_path_factory) -> dict[str, Path]:
    return write_small_checkpoints(tmp_path_factory.mktemp("small_ckpt"))


@pytest.fixture(scope="session")
def small_trident(small_ckpts):
    from trident_core import Trident

    return Trident.from_files(small_ckpts["clip"], small_ckpts["dino"], small_ckpts["sam"], device="cpu")


@pytest.fixture(scope="session")
def full_ckpts(tmp_path_factory) -> dict[str, Path]:
    """The reference's portable full-size random checkpoints, rebuilt and verified tensor for tensor."""
    if not GOLDEN.is_dir():
        pytest.skip(f"{GOLDEN} is absent (a user's own checkout): the golden reference tests need ../shared")
    out = tmp_path_factory.mktemp("full_ckpt")
    subprocess.run([sys.executable, str(SHARED / "reference-harness" / "make_portable_checkpoints.py"), "--out",
                    str(out), "--verify", str(GOLDEN / "checkpoints.json")], check=True, capture_output=True)
    return {"clip": out / "clip_ViT-B-16_openai.pt", "dino": out / "dino_vitbase16_pretrain.pth",
            "sam": out / "sam_vit_b_01ec64.pth"}


@pytest.fixture(scope="session")
def full_trident(full_ckpts):
    from trident_core import Trident

    device = os.environ.get("TRIDENT_TEST_DEVICE", "cpu")  # the golden tests also run on a GPU in fp32
    if device.startswith("cuda"):
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return Trident.from_files(full_ckpts["clip"], full_ckpts["dino"], full_ckpts["sam"], device=device,
                              precision="fp32")


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photograph (scikit-image's astronaut, public domain), 512x512 RGB."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """The command line's cache folder (text embeddings, file digests) is a temporary one, never the user's."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRIDENT_CACHE", str(tmp_path_factory.mktemp("trident_cache")))
    yield
    patch.undo()
