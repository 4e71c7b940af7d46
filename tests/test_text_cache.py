"""Text embeddings on disk: a second process with the same classes skips the text encoder and gets the same
embeddings; another CLIP file, other names or a damaged cache file are misses; file digests are remembered."""

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
    base = text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl, torch.float32, "cpu")
    assert base == text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl, torch.float32, "cpu")
    others = [text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES[::-1], tmpl, torch.float32, "cpu"),
              text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl[:-1], torch.float32, "cpu"),
              text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl, torch.float16, "cpu"),
              text_cache.cache_file(tmp_path, str(small_ckpts["clip"]), NAMES, tmpl, torch.float32, "cuda")]
    assert len({base, *others}) == 5
    copy = tmp_path / "copy.safetensors"  # the same content under another name: the same key
    shutil.copy(small_ckpts["clip"], copy)
    assert text_cache.cache_file(tmp_path, str(copy), NAMES, tmpl, torch.float32, "cpu") == base
    data = bytearray(copy.read_bytes())  # one byte changed: another key
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    assert text_cache.cache_file(tmp_path, str(copy), NAMES, tmpl, torch.float32, "cpu") != base


def test_file_digest_is_the_sha256_and_remembered(tmp_path, monkeypatch):
    import hashlib

    f = tmp_path / "w.bin"
    f.write_bytes(b"weights" * 1000)
    want = f"{7000}-{hashlib.sha256(b'weights' * 1000).hexdigest()}"
    assert text_cache.file_digest(f, tmp_path) == want
    text_cache._memo.clear()  # a new process: the digest comes from the memo file, the file is not read

    def no_read(*_a, **_k):
        raise AssertionError("hashed again")

    monkeypatch.setattr(text_cache.hashlib, "sha256", no_read)
    assert text_cache.file_digest(f, tmp_path) == want
    monkeypatch.undo()
    (tmp_path / text_cache.HASHES).write_text("{not json")  # a damaged memo: hashed again
    text_cache._memo.clear()
    assert text_cache.file_digest(f, tmp_path) == want


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "nan"])
def test_a_damaged_cache_file_is_ignored_and_rewritten(small_ckpts, tmp_path, damage):
    want = text.encode_names(_clip(small_ckpts["clip"], tmp_path), NAMES)
    (path,) = tmp_path.glob("*.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        bad = torch.zeros(2, want.shape[1]) if damage == "wrong_shape" else torch.full_like(want, float("nan"))
        text_cache.save(path, NAMES, bad)
    got = text.encode_names(_clip(small_ckpts["clip"], tmp_path), NAMES)
    assert torch.equal(got, want)
    assert torch.equal(text_cache.load(path, NAMES, want.shape[1]), want)  # rewritten


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
