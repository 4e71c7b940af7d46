"""Tests for trident_core.download against a local HTTP server on 127.0.0.1 (never the real network)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trident_core import download as dl
from trident_core.download import (
    MODELS,
    DownloadError,
    ModelFile,
    ModelFileMissing,
    cache_dir,
    download,
    download_enabled,
    ensure_file,
    find_model,
    resolve_url,
)

# 2.5 MiB so a download spans several 1 MiB chunks and the progress callback fires more than once.
GOOD = bytes(range(256)) * (10 * 1024)
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
OTHER = b"x" * len(GOOD)  # same size as GOOD, different hash
FAKE_HOST = "https://files.example.invalid"
PAGE = b"<!DOCTYPE html><html><body>Please log in</body></html>\n" * 50


def _checkpoint_bytes() -> bytes:
    """A small DINO checkpoint as torch.save writes it (what a registry file of role "dino" must parse as)."""
    import io

    import torch
    from factory import small_dino_state

    buffer = io.BytesIO()
    torch.save(small_dino_state(), buffer)
    return buffer.getvalue()


CKPT = _checkpoint_bytes()


@dataclass
class Server:
    """The running test server: its base URL and the paths requested so far."""

    base: str
    hits: list[str] = field(default_factory=list)
    pair: threading.Barrier = field(default_factory=lambda: threading.Barrier(2, timeout=3))
    slow: threading.Event = field(default_factory=threading.Event)


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    """Build a request handler with one route per failure mode, recording every request on ``server``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        def _send(self, body: bytes, length: int | None = None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            server.hits.append(self.path)
            name = self.path.rsplit("/", 1)[-1]
            if name == "good.bin":
                self._send(GOOD, len(GOOD))
            elif name == "truncated.bin":
                self._send(GOOD[: len(GOOD) // 2], len(GOOD))  # promise all, send half, close
            elif name == "other.bin":
                self._send(OTHER, len(OTHER))
            elif name == "nolength.bin":
                self._send(GOOD)  # HTTP/1.0 body delimited by closing the connection
            elif name == "ckpt.pth":
                self._send(CKPT, len(CKPT))
            elif name == "cut.pth":
                self._send(CKPT[: len(CKPT) // 2])  # no Content-Length: the cut is invisible to the transfer
            elif name == "page.html":  # a web page with status 200, announced as such
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(PAGE)))
                self.end_headers()
                self.wfile.write(PAGE)
            elif name == "page.bin":  # the same page, mislabelled as a binary file
                self._send(PAGE, len(PAGE))
            elif name == "loop":
                self.send_response(302)
                self.send_header("Location", self.path)
                self.end_headers()
            elif name == "slow.pth":  # half the file, then nothing until the client goes away
                self.send_response(200)
                self.send_header("Content-Length", str(len(GOOD)))
                self.end_headers()
                self.wfile.write(GOOD[: len(GOOD) // 2])
                self.wfile.flush()
                server.slow.wait(30)
            elif name == "pair.bin":
                server.pair.wait()  # answer only once both concurrent clients are connected
                self._send(GOOD, len(GOOD))
            else:
                self.send_error(404, "Not Found")

    return Handler


@pytest.fixture(scope="module")
def running_server() -> Iterator[Server]:
    """Serve the routes above on 127.0.0.1 at a free port for the whole module."""
    state = Server(base="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    state.slow.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def server(running_server: Server) -> Server:
    """The shared server with its request log and concurrency barrier reset for one test."""
    running_server.hits.clear()
    running_server.pair.reset()
    return running_server


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test with no download-related environment variables set."""
    for var in ("TRIDENT_NO_DOWNLOAD", "HF_HUB_OFFLINE", "TRIDENT_DOWNLOAD_MIRROR", "HF_ENDPOINT", "TRIDENT_CACHE"):
        monkeypatch.delenv(var, raising=False)


def _register(monkeypatch: pytest.MonkeyPatch, *paths: str, size: int | None = None,
              sha256: str | None = GOOD_SHA) -> ModelFile:
    """Add a test model to the registry whose official URLs live on a fake host, reached only through the mirror."""
    record = ModelFile("test_model", "test_model.bin", "dino", tuple(FAKE_HOST + p for p in paths), size, sha256,
                       "test model")
    monkeypatch.setitem(MODELS, record.name, record)
    return record


def _leftovers(folder: Path) -> list[str]:
    """Names of temporary download files left in ``folder``."""
    return [p.name for p in folder.iterdir() if ".part-" in p.name]


def test_good_file_arrives_intact(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "good.bin"
    assert download(f"{server.base}/good.bin", dest, len(GOOD), GOOD_SHA, progress=lambda d, t: None) == dest
    assert dest.read_bytes() == GOOD
    assert _leftovers(dest.parent) == []


def test_progress_increases_to_total(server: Server, tmp_path: Path) -> None:
    calls: list[tuple[int, int | None]] = []
    download(f"{server.base}/good.bin", tmp_path / "f.bin", progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert len(calls) >= 3
    assert done[0] == 0 and done[-1] == len(GOOD)
    assert all(a < b for a, b in zip(done, done[1:]))
    assert {t for _, t in calls} == {len(GOOD)}


def test_default_progress_prints_to_stderr(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    download(f"{server.base}/good.bin", tmp_path / "f.bin")
    err = capsys.readouterr().err
    assert "f.bin" in err and "100%" in err
    assert len(err.splitlines()) <= 3  # throttled: first line and final line, not one per chunk


def test_truncated_body_fails_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "t.bin"
    with pytest.raises(DownloadError, match="truncated") as info:
        download(f"{server.base}/truncated.bin", dest, progress=lambda d, t: None)
    assert "truncated.bin" in str(info.value)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_wrong_hash_from_registry_fails(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, "/files/other.bin", size=len(GOOD))
    monkeypatch.setenv("TRIDENT_DOWNLOAD_MIRROR", server.base)
    with pytest.raises(DownloadError, match="SHA-256"):
        ensure_file("test_model", tmp_path, progress=lambda d, t: None)
    assert server.hits == ["/files/other.bin"]
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_fails_before_body(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="expected 12345"):
        download(f"{server.base}/good.bin", tmp_path / "f.bin", expected_size=12345, progress=lambda d, t: None)
    assert list(tmp_path.iterdir()) == []


def test_404_fails_naming_status_and_url(server: Server, tmp_path: Path) -> None:
    url = f"{server.base}/missing.bin"
    with pytest.raises(DownloadError, match="404") as info:
        download(url, tmp_path / "m.bin", progress=lambda d, t: None)
    assert url in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_is_download_error(tmp_path: Path) -> None:
    probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = probe.server_address[1]
    probe.server_close()  # nothing listens on this port any more
    with pytest.raises(DownloadError, match=f"127.0.0.1:{port}"):
        download(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", progress=lambda d, t: None, timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_unknown_length_uses_expected_size(server: Server, tmp_path: Path) -> None:
    calls: list[int | None] = []
    dest = download(f"{server.base}/nolength.bin", tmp_path / "a.bin", expected_size=len(GOOD),
                    progress=lambda d, t: calls.append(t))
    assert dest.read_bytes() == GOOD and set(calls) == {len(GOOD)}
    with pytest.raises(DownloadError, match="more than"):
        download(f"{server.base}/nolength.bin", tmp_path / "b.bin", expected_size=1000, progress=lambda d, t: None)
    assert not (tmp_path / "b.bin").exists() and _leftovers(tmp_path) == []


def test_interrupt_removes_temp_and_propagates(server: Server, tmp_path: Path) -> None:
    def interrupt(done: int, total: int | None) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(f"{server.base}/good.bin", tmp_path / "k.bin", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_returned_without_request(server: Server, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, "/files/good.bin")
    monkeypatch.setenv("TRIDENT_DOWNLOAD_MIRROR", server.base)
    (tmp_path / "test_model.bin").write_bytes(b"already here")
    assert ensure_file("test_model", tmp_path) == tmp_path / "test_model.bin"
    assert ensure_file("test_model.bin", tmp_path) == tmp_path / "test_model.bin"
    assert server.hits == []


def test_ensure_file_downloads_missing_known_file(server: Server, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, "/files/missing.bin", "/files/ckpt.pth", size=len(CKPT),
              sha256=hashlib.sha256(CKPT).hexdigest())
    path = ensure_file("test_model.bin", tmp_path / "models", progress=lambda d, t: None, mirror=server.base + "/")
    assert path == tmp_path / "models" / "test_model.bin"
    assert path.read_bytes() == CKPT
    assert server.hits == ["/files/missing.bin", "/files/ckpt.pth"]  # first source 404s, second one serves
    assert _leftovers(path.parent) == []


def test_all_sources_failing_raises_download_error(server: Server, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    record = _register(monkeypatch, "/files/missing.bin", "/files/truncated.bin")
    with pytest.raises(DownloadError) as info:
        ensure_file("test_model", tmp_path, progress=lambda d, t: None, mirror=server.base)
    message = str(info.value)
    assert "404" in message and "truncated" in message and record.urls[0] in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("var", ["TRIDENT_NO_DOWNLOAD", "HF_HUB_OFFLINE"])
def test_disabled_download_names_folder_file_and_url(server: Server, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    record = _register(monkeypatch, "/files/good.bin")
    monkeypatch.setenv("TRIDENT_DOWNLOAD_MIRROR", server.base)
    monkeypatch.setenv(var, "1")
    with pytest.raises(ModelFileMissing) as info:
        ensure_file("test_model", tmp_path, allow_download=True)
    message = str(info.value)
    assert str(tmp_path) in message and "test_model.bin" in message and record.urls[0] in message and var in message
    assert isinstance(info.value, FileNotFoundError)
    assert server.hits == [] and list(tmp_path.iterdir()) == []


def test_explicit_false_blocks_download(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, "/files/good.bin")
    with pytest.raises(ModelFileMissing, match="turned off"):
        ensure_file("test_model", tmp_path, allow_download=False, mirror=server.base)
    assert server.hits == []


def test_unknown_missing_file_is_model_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelFileMissing, match="not a known model file") as info:
        ensure_file("mystery.pth", tmp_path)
    assert str(tmp_path) in str(info.value)


def test_concurrent_downloads_both_succeed(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "pair.bin"
    results: list[object] = []

    def fetch() -> None:
        try:
            results.append(download(f"{server.base}/pair.bin", dest, len(GOOD), GOOD_SHA, lambda d, t: None))
        except Exception as exc:  # collected and asserted on below
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [dest, dest]
    assert dest.read_bytes() == GOOD
    assert len(server.hits) == 2 and _leftovers(tmp_path) == []


def test_replace_refused_but_valid_copy_present(server: Server, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "w.bin"

    def locked_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        Path(dst).write_bytes(GOOD)  # another process finished first and keeps the file open (Windows)
        raise PermissionError(13, "file in use", str(dst))

    monkeypatch.setattr(dl.os, "replace", locked_replace)
    assert download(f"{server.base}/good.bin", dest, progress=lambda d, t: None) == dest
    assert dest.read_bytes() == GOOD and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("explicit", "env", "expected"),
    [(None, {}, True), (True, {}, True), (False, {}, False), (None, {"TRIDENT_NO_DOWNLOAD": "1"}, False),
     (True, {"HF_HUB_OFFLINE": "1"}, False), (None, {"TRIDENT_NO_DOWNLOAD": "0"}, True)],
)
def test_download_enabled(monkeypatch: pytest.MonkeyPatch, explicit: bool | None, env: dict[str, str],
                          expected: bool) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert download_enabled(explicit) is expected


def test_resolve_url(monkeypatch: pytest.MonkeyPatch) -> None:
    hf = "https://huggingface.co/laion/x/resolve/main/m.safetensors?download=1"
    fb = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert resolve_url(fb) == fb
    assert resolve_url(fb, "http://127.0.0.1:9/") == "http://127.0.0.1:9/segment_anything/sam_vit_b_01ec64.pth"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    assert resolve_url(hf) == "https://hf-mirror.example/laion/x/resolve/main/m.safetensors?download=1"
    assert resolve_url(fb) == fb
    monkeypatch.setenv("TRIDENT_DOWNLOAD_MIRROR", "http://127.0.0.1:9/pfx")
    assert resolve_url(hf) == "http://127.0.0.1:9/pfx/laion/x/resolve/main/m.safetensors?download=1"


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_dir() == Path.home() / ".cache" / "trident"
    monkeypatch.setenv("TRIDENT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_registry_is_consistent() -> None:
    filenames = [m.filename for m in MODELS.values()]
    assert len(set(filenames)) == len(filenames)
    assert {m.role for m in MODELS.values()} == {"clip", "dino", "sam"}
    for name, record in MODELS.items():
        assert record.name == name and find_model(record.filename) is record
        assert record.urls and all(u.startswith("https://") for u in record.urls)
        assert record.sha256 is None or (len(record.sha256) == 64 and int(record.sha256, 16) >= 0)
    assert MODELS["sam_vit_h"].size == 2564550879
    assert all(MODELS[f"sam_vit_{v}"].sha256 for v in "blh")  # Meta's published files (widely pinned hashes)
    assert MODELS["clip_vit_b16_openai_torchscript"].sha256 in MODELS["clip_vit_b16_openai_torchscript"].urls[0]
    assert find_model("nope") is None


# ------------------------------------------------------------------ nothing wrong gets the final name (issue 12)

@pytest.mark.parametrize(("route", "why"), [
    ("page.html", "web page"),  # HTML with status 200, announced as text/html
    ("page.bin", "web page"),  # HTML with status 200, announced as a binary file
    ("cut.pth", "cannot be read as a checkpoint"),  # no Content-Length, cut short: the transfer looks complete
    ("good.bin", "cannot be read as a checkpoint"),  # arbitrary bytes
])
def test_what_is_not_the_model_never_gets_the_final_name(server: Server, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, route: str, why: str) -> None:
    _register(monkeypatch, f"/files/{route}", sha256=None)
    with pytest.raises(DownloadError) as info:
        ensure_file("test_model", tmp_path, progress=lambda d, t: None, mirror=server.base)
    message = str(info.value)
    assert why in message and "\n" not in message and "test_model.bin" in message and "by hand" in message, message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError):  # and the next run tries again rather than accepting a file
        ensure_file("test_model", tmp_path, progress=lambda d, t: None, mirror=server.base)


def test_a_checkpoint_of_another_model_is_not_installed(server: Server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    record = _register(monkeypatch, "/files/ckpt.pth", sha256=None)
    monkeypatch.setitem(MODELS, record.name, ModelFile(**{**record.__dict__, "role": "sam"}))
    with pytest.raises(DownloadError, match="is not a Segment Anything checkpoint.*DINO|dino"):
        ensure_file("test_model", tmp_path, progress=lambda d, t: None, mirror=server.base)
    assert list(tmp_path.iterdir()) == []


def test_a_web_page_is_refused_by_download_itself(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="web page"):
        download(f"{server.base}/page.html", tmp_path / "f.bin", progress=lambda d, t: None)
    assert list(tmp_path.iterdir()) == []


def test_redirect_loop_is_one_line(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        download(f"{server.base}/loop", tmp_path / "f.bin", progress=lambda d, t: None)
    message = str(info.value)
    assert "\n" not in message and "redirects in a loop" in message and "/loop" in message
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_a_killed_download_are_removed_by_the_next_run(server: Server, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import signal
    import subprocess
    import sys
    import time

    code = (f"from trident_core.download import download; download({server.base + '/slow.pth'!r}, "
            f"{str(tmp_path / 'test_model.bin')!r}, progress=lambda d, t: None)")
    env = {**os.environ, "PYTHONPATH": str(Path(dl.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 30
    while not [p for p in tmp_path.iterdir() if p.stat().st_size > 0] and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _leftovers(tmp_path)
    assert len(left) == 1 and f".part-{proc.pid}-" in left[0]  # SIGKILL runs no clean-up
    mine = tmp_path / f"other.bin.part-{os.getpid()}-0123abcd"  # a live process's download in progress
    mine.write_bytes(b"x")
    _register(monkeypatch, "/files/ckpt.pth", sha256=None)
    ensure_file("test_model", tmp_path, progress=lambda d, t: None, mirror=server.base)
    # the killed one's file, written a moment ago, may as well be a live download of another container sharing the
    # folder (whose process numbers this one cannot see): kept until nothing was written to it for five minutes
    assert sorted(_leftovers(tmp_path)) == sorted([mine.name, left[0]])
    quiet = time.time() - 6 * 60
    os.utime(tmp_path / left[0], (quiet, quiet))
    os.utime(mine, (quiet, quiet))  # (its process is alive: kept)
    ensure_file("test_model", tmp_path)
    assert _leftovers(tmp_path) == [mine.name]
    old = time.time() - 2 * 3600  # not written to for two hours: abandoned whatever its process
    os.utime(mine, (old, old))
    ensure_file("test_model", tmp_path)  # present: returned, and the folder swept
    assert _leftovers(tmp_path) == []


def test_a_download_folder_that_is_a_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "cache"
    blocker.write_bytes(b"")
    _register(monkeypatch, "/files/ckpt.pth", sha256=None)
    with pytest.raises(ModelFileMissing, match=f"{blocker} is a file, not a folder.*TRIDENT_CACHE"):
        ensure_file("test_model", blocker)
    with pytest.raises(DownloadError, match="cannot be created|is a file") as info:
        download("http://127.0.0.1:9/x", blocker / "sub" / "x.bin", progress=lambda d, t: None)
    assert str(blocker) in str(info.value) and "\n" not in str(info.value)


def test_a_temporary_named_with_no_possible_process_is_left_alone(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray file whose number is no process number (too large for the system) crashed every load."""
    stray = tmp_path / "foo.pth.part-99999999999999999999-deadbeef"
    stray.write_bytes(b"x")
    quiet = time.time() - 6 * 60
    os.utime(stray, (quiet, quiet))
    (tmp_path / "test_model.bin").write_bytes(b"here")
    _register(monkeypatch, "/files/ckpt.pth")
    assert ensure_file("test_model", tmp_path) == tmp_path / "test_model.bin"
    assert stray.exists()


def test_a_known_file_of_another_model_in_a_slot_is_refused_before_downloading(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--clip sam_vit_h_4b8939.pth` fetched the 2.4 GiB SAM file, refused only once it had arrived."""
    monkeypatch.setenv("TRIDENT_DOWNLOAD_MIRROR", server.base)
    with pytest.raises(ModelFileMissing, match="sam_vit_h_4b8939.pth is Segment Anything ViT-H .*not a CLIP model"):
        ensure_file("sam_vit_h_4b8939.pth", tmp_path, role="clip")
    assert server.hits == [] and list(tmp_path.iterdir()) == []


def test_a_link_to_a_missing_file_is_named_and_left_alone(server: Server, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A link to an unmounted drive was "not in the folder", then replaced by a download."""
    _register(monkeypatch, "/files/ckpt.pth", sha256=None)
    link = tmp_path / "test_model.bin"
    link.symlink_to("/mnt/unmounted/test_model.bin")
    with pytest.raises(ModelFileMissing, match="is a link to /mnt/unmounted/test_model.bin, which is not a file"):
        ensure_file("test_model", tmp_path, mirror=server.base)
    assert link.is_symlink() and server.hits == []


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*_a: object, **_k: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", refused)
    with pytest.raises(DownloadError, match=f"The model folder {tmp_path} cannot be written .*TRIDENT_CACHE") as info:
        download("http://127.0.0.1:9/x", tmp_path / "x.bin", progress=lambda d, t: None)
    assert "\n" not in str(info.value) and ".part-" not in str(info.value)


def test_a_folder_that_cannot_be_written_is_one_line_from_ensure_file(server: Server, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """ensure_file logged it and wrapped it in "Could not download ...": two lines, the advice twice."""
    _register(monkeypatch, "/files/ckpt.pth", sha256=None)
    real_open = open

    def refused(file: object, *a: object, **k: object) -> object:
        if ".part-" in str(file):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", refused)
    with caplog.at_level("WARNING"), pytest.raises(DownloadError) as info:
        ensure_file("test_model", tmp_path, mirror=server.base)
    message = str(info.value)
    assert message.startswith(f"The model folder {tmp_path} cannot be written") and "Could not download" not in message
    assert message.count("TRIDENT_CACHE") == 1 and not caplog.records and server.hits == []


def test_the_first_writable_folder_is_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trident_core.download import writable_folder

    locked, free, new = tmp_path / "locked", tmp_path / "free", tmp_path / "free" / "new"
    locked.mkdir()
    free.mkdir()
    monkeypatch.setattr(dl.os, "access", lambda p, mode: Path(p) != locked)
    assert writable_folder([locked, free]) == free
    assert writable_folder([locked, new]) == new  # (made when the download starts)
    assert writable_folder([locked]) == locked  # (none: the first, whose error then says why)


def test_the_by_hand_advice_names_the_file_to_save_as(tmp_path: Path) -> None:
    """The URL of the default CLIP ends in open_clip_model.safetensors: a file saved under that name was not found."""
    with pytest.raises(ModelFileMissing, match="open_clip_model.safetensors, save it as "
                                               "ViT-B-16_openai_open_clip_model.safetensors and put it in"):
        ensure_file("clip_vit_b16_openai", tmp_path, allow_download=False)
    with pytest.raises(ModelFileMissing) as info:
        ensure_file("sam_vit_b", tmp_path, allow_download=False)
    assert "save it as" not in str(info.value)  # (the URL's own name is the file's)
