"""Text embeddings on disk: a second process with the same classes skips the text encoder and gets the same
embeddings; another CLIP file, other names or a damaged cache file are misses; a cache that cannot be written
or read is a logged miss, never the end of the run."""

from __future__ import annotations

import shutil

import pytest
import torch

import trident_core.text as text
from trident_core import text_cache
from trident_core.models import ClipModel, load_clip

NAMES = ["sky", "person", "astronaut", "flag"]


def _clip(path, folder):
    clip = load_clip(path)
    clip.disk_cache = folder
    return clip


def _no_encoder(monkeypatch):
    def fail(*_a, **_k):
        raise AssertionError("the text encoder ran")

    monkeypatch.setattr(ClipModel, "encode_prompts", fail)


def test_second_model_reads_the_embeddings_instead_of_encoding(small_ckpts, tmp_path, monkeypatch):
    plain = load_clip(small_ckpts["clip"])  # no disk cache: the encoder's own result
    want = text.encode_names(plain, NAMES)
    first = text.encode_names(_clip(small_ckpts["clip"], tmp_path), NAMES)
    assert torch.equal(first, want)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    _no_encoder(monkeypatch)
    again = text.encode_names(_clip(small_ckpts["clip"], tmp_path), NAMES)  # a fresh model: empty memory cache
    assert torch.equal(again, want)
    with pytest.raises(AssertionError, match="encoder ran"):  # other names are not in the cache
        text.encode_names(_clip(small_ckpts["clip"], tmp_path), ["horse"])


def test_the_key_holds_the_clip_content_templates_dtype_and_device(small_ckpts, tmp_path):
    tmpl = ClipModel.templates()
    base = text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl, torch.float32, "cpu", True)
    assert base == text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl, torch.float32, "cpu", True)
    others = [text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES[::-1], tmpl, torch.float32, "cpu", True),
              text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl[:-1], torch.float32, "cpu", True),
              text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl, torch.float16, "cpu", True),
              text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl, torch.float32, "cuda", True),
              text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl, torch.float32, "cpu", False)]
    assert len({base, *others}) == 6  # (the same file run with GELU: other features)
    copy = tmp_path / "copy.safetensors"  # the same content under another name: the same key
    shutil.copy(small_ckpts["clip"], copy)
    assert text_cache.cache_file(tmp_path, str(copy), NAMES, tmpl, torch.float32, "cpu", True) == base
    data = bytearray(copy.read_bytes())  # one byte changed: another key
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    assert text_cache.cache_file(tmp_path, str(copy), NAMES, tmpl, torch.float32, "cpu", True) != base


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "nan", "zeroed_tail"])
def test_a_damaged_cache_file_is_ignored_and_rewritten(small_ckpts, tmp_path, damage):
    want = text.encode_names(_clip(small_ckpts["clip"], tmp_path), NAMES)
    (path,) = tmp_path.glob("*.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "zeroed_tail":  # (a disk that lost the file's last blocks: the header reads, a row is zeros)
        data = path.read_bytes()
        path.write_bytes(data[:-want.shape[1] * 4] + bytes(want.shape[1] * 4))
    else:
        bad = torch.zeros(2, want.shape[1]) if damage == "wrong_shape" else torch.full_like(want, float("nan"))
        text_cache.save(path, NAMES, bad)
    got = text.encode_names(_clip(small_ckpts["clip"], tmp_path), NAMES)
    assert torch.equal(got, want)
    assert torch.equal(text_cache.load(path, NAMES, want.shape[1]), want)  # rewritten


@pytest.mark.parametrize("damage", ["folder_is_a_file", "file_is_a_folder", "huge_file"])
def test_a_cache_that_cannot_be_used_is_a_logged_miss(small_ckpts, tmp_path, damage, caplog):
    from trident_core import caches

    caches.forget()
    want = text.encode_names(load_clip(small_ckpts["clip"]), NAMES)
    folder = tmp_path / "cache"
    if damage == "folder_is_a_file":
        folder.write_bytes(b"not a folder")
    else:
        clip = _clip(small_ckpts["clip"], folder)
        path = text_cache.cache_file(folder, str(small_ckpts["clip"]), NAMES, clip.templates(), torch.float32, "cpu",
                                     clip.quick_gelu)
        folder.mkdir(exist_ok=True)
        if damage == "file_is_a_folder":
            path.mkdir()
        else:
            with open(path, "wb") as f:  # a sparse 1 GB file: refused by its size, never read into memory
                f.truncate(1 << 30)
    with caplog.at_level("WARNING", logger="trident_core.cache"):
        got = text.encode_names(_clip(small_ckpts["clip"], folder), NAMES)
    assert torch.equal(got, want)
    # (the small CLIP's own warning and, run alone, the file digests' cache in the same folder are other lines)
    lines = [r.getMessage() for r in caplog.records if "text embeddings cache" in r.getMessage()]
    assert len(lines) == 1 and "cannot be used, the run goes on without it" in lines[0]


def test_command_line_second_run_skips_the_text_encoder(small_ckpts, photo, tmp_path, monkeypatch):
    from PIL import Image

    from trident_core.cli import main

    monkeypatch.setenv("TRIDENT_CACHE", str(tmp_path / "cache"))
    Image.fromarray(photo[:96, :128]).save(tmp_path / "x.png")
    args = ["segment", str(tmp_path / "x.png"), "--classes", "sky, person", "--clip", str(small_ckpts["clip"]),
            "--dino", str(small_ckpts["dino"]), "--sam", str(small_ckpts["sam"]), "--device", "cpu",
            "--no-download", "--save-npz"]
    assert main([*args, str(tmp_path / "a.npz")]) == 0
    assert list((tmp_path / "cache" / "text-embeddings").glob("*.safetensors"))
    _no_encoder(monkeypatch)
    assert main([*args, str(tmp_path / "b.npz")]) == 0
    import numpy as np

    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
