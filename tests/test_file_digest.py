"""Model files are identified by their content: a digest is remembered, but never trusted for a file that was
replaced since, even by other bytes of the same size and modification time (as `cp -p` and `rsync -a` leave them);
a damaged or unwritable memo is a logged miss."""

from __future__ import annotations

import hashlib
import os

import pytest

from trident_core import caches, file_digest
from trident_core.file_digest import HASHES


def _weights(path, seed: int, size: int = 5 << 20) -> str:
    """Write `size` pseudo-random bytes; return what the digest must be (computed here with hashlib)."""
    data = hashlib.shake_256(str(seed).encode()).digest(size)
    path.write_bytes(data)
    return f"{size}-{hashlib.sha256(data).hexdigest()}"


def _count_full_hashes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = file_digest.full_digest
    monkeypatch.setattr(file_digest, "full_digest", lambda p: calls.append(str(p)) or real(p))
    return calls


def test_the_digest_is_the_sha256_hashed_once_and_remembered_across_processes(tmp_path, monkeypatch):
    f = tmp_path / "w.pth"
    want = _weights(f, 1)
    calls = _count_full_hashes(monkeypatch)
    assert file_digest.file_digest(f, tmp_path) == want
    file_digest.forget()  # a new process: the memo file answers
    assert file_digest.file_digest(f, tmp_path) == want
    assert len(calls) == 1


@pytest.mark.parametrize("how", ["rewritten_in_place", "replaced_by_rename"])
def test_other_weights_with_the_same_size_and_time_are_hashed_again(tmp_path, monkeypatch, how):
    f = tmp_path / "w.pth"
    _weights(f, 1)
    first = file_digest.file_digest(f, tmp_path)
    st = os.stat(f)
    if how == "rewritten_in_place":  # cp -p over the file: same inode, new content, old mtime
        want = _weights(f, 2)
    else:  # rsync -a: a new file renamed over it, old mtime
        want = _weights(tmp_path / "new", 2)
        os.replace(tmp_path / "new", f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    file_digest.forget()
    assert file_digest.file_digest(f, tmp_path) == want != first


def test_a_swap_that_keeps_every_stat_field_is_caught_by_the_sampled_blocks(tmp_path, monkeypatch):
    """Where inode and status-change time cannot tell (some file systems), the sampled hash still does."""
    f = tmp_path / "w.pth"
    _weights(f, 1)
    monkeypatch.setattr(file_digest, "_stat_key", lambda st: [st.st_size, 0, 0, 0])
    first = file_digest.file_digest(f, tmp_path)
    want = _weights(f, 2)  # other weights of the same size
    file_digest.forget()
    assert file_digest.file_digest(f, tmp_path) == want != first


@pytest.mark.parametrize("memo", ['{"a": ' * 5000 + "1" + "}" * 5000, '{"x": 1e999}', '{"x": ' + "9" * 5000 + "}",
                                  "{not json", "[1, 2]", "\xff\xfe"])
def test_a_damaged_memo_is_a_logged_miss(tmp_path, memo, caplog):
    f = tmp_path / "w.pth"
    want = _weights(f, 3, 4096)
    (tmp_path / HASHES).write_text(memo, encoding="latin-1")
    caches.forget()
    file_digest.forget()
    with caplog.at_level("WARNING", logger="trident_core.cache"):
        assert file_digest.file_digest(f, tmp_path) == want
    assert any("model file digests cache" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("where", ["memo_is_a_folder", "folder_is_a_file"])
def test_an_unwritable_memo_only_costs_hashing_again(tmp_path, where, caplog):
    f = tmp_path / "w.pth"
    want = _weights(f, 4, 4096)
    folder = tmp_path / "memo"
    if where == "memo_is_a_folder":
        (folder / HASHES).mkdir(parents=True)
    else:
        folder.write_bytes(b"a file where the cache folder belongs")
    caches.forget()
    file_digest.forget()
    with caplog.at_level("WARNING", logger="trident_core.cache"):
        assert file_digest.file_digest(f, folder) == want
        file_digest.forget()
        assert file_digest.file_digest(f, folder) == want
    assert len([r for r in caplog.records if "model file digests" in r.getMessage()]) == 1  # logged once


def test_a_remembered_digest_that_is_not_a_digest_is_hashed_again(tmp_path, monkeypatch):
    """The digest names the converted copy's file: a memo entry whose digest is a path ("x/../../escape") is not
    trusted, however well its stat and sample match; the file is hashed again and the memo mended."""
    import json

    f = tmp_path / "model.bin"
    want = _weights(f, 5)
    memo = tmp_path / "memo"
    memo.mkdir()
    assert file_digest.file_digest(f, memo) == want
    entries = json.loads((memo / HASHES).read_text())
    entries[str(f)]["digest"] = "x/../../../escape/evil"
    (memo / HASHES).write_text(json.dumps(entries))
    file_digest.forget()
    calls = _count_full_hashes(monkeypatch)
    assert file_digest.file_digest(f, memo) == want and calls == [str(f)]
    assert json.loads((memo / HASHES).read_text())[str(f)]["digest"] == want
