"""Fetch known model files (CLIP, DINO, SAM) from their official sources on first use.

A download streams into a uniquely named temporary file next to its destination, is checked against the
server's Content-Length, the expected size and the SHA-256 where the publisher gives them and, for a known model
file, parsed as a checkpoint of the expected model; only then is it renamed into place atomically: no reader
ever sees a partial or wrong file, and two processes fetching the same file both end with a valid copy. A web
page sent instead of the file is refused. Temporary files left by a killed process (not written to for five
minutes and their process not seen, or for an hour) are removed by the next download into that folder. Nothing
here touches the network at import time; only the standard library is used (the checkpoint check imports torch
when it runs).

Environment variables:
    TRIDENT_NO_DOWNLOAD=1     never download (``HF_HUB_OFFLINE=1`` does the same)
    TRIDENT_DOWNLOAD_MIRROR   replaces scheme and host of every official URL, e.g. ``http://127.0.0.1:8000``
    HF_ENDPOINT               replaces ``https://huggingface.co`` only (a Hugging Face mirror)
    TRIDENT_CACHE             folder returned by :func:`cache_dir` (default ``~/.cache/trident``)
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import urlsplit, urlunsplit

Role = Literal["clip", "dino", "sam"]
ProgressFn = Callable[[int, int | None], None]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_USER_AGENT = "ComfyUI-Trident"
_TRUTHY = {"1", "true", "yes", "on"}
_OFF_SWITCHES = ("TRIDENT_NO_DOWNLOAD", "HF_HUB_OFFLINE")
_TEMP = re.compile(r"^.+\.part-(\d+)-[0-9a-f]{8}$")
_STALE_AFTER = 3600.0  # seconds without a write after which a temporary file is abandoned whatever its process
# ... and after which one whose process is not seen is: a live download writes every few seconds (each read waits
# 30 s at most), and the process may live in another container sharing the folder, where its number means nothing
_UNSEEN_AFTER = 300.0


class DownloadError(RuntimeError):
    """A download failed (HTTP error, dropped connection, wrong size or hash); no file was left behind."""


class FolderNotWritable(DownloadError):
    """The model folder cannot be made or written: no source would do better, so it is raised as it is."""


class ModelFileMissing(FileNotFoundError):
    """A model file is absent and cannot be downloaded; the message says where to get it and where to put it."""


@dataclass(frozen=True)
class ModelFile:
    """One known model file: where it comes from and what it must look like, so it can be fetched and verified."""

    name: str
    filename: str
    role: Role
    urls: tuple[str, ...]
    size: int | None
    sha256: str | None
    description: str


_FB = "https://dl.fbaipublicfiles.com"
_HF = "https://huggingface.co"

MODELS: dict[str, ModelFile] = {
    m.name: m
    for m in (
        ModelFile(
            "clip_vit_b16_openai",
            "ViT-B-16_openai_open_clip_model.safetensors",
            "clip",
            (f"{_HF}/timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_model.safetensors",),
            None,
            None,
            "CLIP ViT-B/16 with OpenAI's weights, open_clip safetensors format",
        ),
        ModelFile(
            "clip_vit_b16_openai_torchscript",
            "ViT-B-16.pt",
            "clip",
            ("https://openaipublic.azureedge.net/clip/models/"
             "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",),
            None,
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
            "CLIP ViT-B/16 with OpenAI's weights, OpenAI's original TorchScript archive",
        ),
        ModelFile(
            "clip_vit_h14_laion2b",
            "ViT-H-14_laion2b_s32b_b79k_open_clip_model.safetensors",
            "clip",
            (f"{_HF}/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/main/open_clip_model.safetensors",),
            None,
            None,
            "OpenCLIP ViT-H/14 trained on LAION-2B (laion2b_s32b_b79k), safetensors format",
        ),
        ModelFile(
            "dino_vitb16",
            "dino_vitbase16_pretrain.pth",
            "dino",
            (f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",),
            None,
            None,
            "DINO ViT-B/16 self-supervised backbone",
        ),
        ModelFile(
            "dino_vits16",
            "dino_deitsmall16_pretrain.pth",
            "dino",
            (f"{_FB}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",),
            None,
            None,
            "DINO ViT-S/16 self-supervised backbone (smaller, faster)",
        ),
        ModelFile(
            "sam_vit_b",
            "sam_vit_b_01ec64.pth",
            "sam",
            (f"{_FB}/segment_anything/sam_vit_b_01ec64.pth",),
            375042383,
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            "Segment Anything ViT-B (358 MiB, fastest)",
        ),
        ModelFile(
            "sam_vit_l",
            "sam_vit_l_0b3195.pth",
            "sam",
            (f"{_FB}/segment_anything/sam_vit_l_0b3195.pth",),
            1249524607,
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            "Segment Anything ViT-L (1.2 GiB)",
        ),
        ModelFile(
            "sam_vit_h",
            "sam_vit_h_4b8939.pth",
            "sam",
            (f"{_FB}/segment_anything/sam_vit_h_4b8939.pth",),
            2564550879,
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            "Segment Anything ViT-H (2.4 GiB, most accurate)",
        ),
    )
}

DEFAULT_FILES: dict[Role, str] = {"clip": MODELS["clip_vit_b16_openai"].filename,
                                  "dino": MODELS["dino_vitb16"].filename, "sam": MODELS["sam_vit_b"].filename}
"""The file each role loads when none is named (the command line's default, the loader nodes' preselection)."""


def find_model(name_or_filename: str) -> ModelFile | None:
    """Look a known model file up by registry name or by filename, so callers may pass either."""
    if name_or_filename in MODELS:
        return MODELS[name_or_filename]
    return next((m for m in MODELS.values() if m.filename == name_or_filename), None)


def cache_dir() -> Path:
    """Return the folder the command line keeps model files in: ``$TRIDENT_CACHE`` or ``~/.cache/trident``."""
    return Path(os.environ.get("TRIDENT_CACHE") or Path.home() / ".cache" / "trident").expanduser()


def _download_blocker(explicit: bool | None) -> str | None:
    """Return why downloading is off (explicit False or an offline environment variable), or None if it is on."""
    if explicit is False:
        return "automatic download is turned off for this call"
    for var in _OFF_SWITCHES:
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return f"the environment variable {var}={os.environ[var]} forbids downloads"
    return None


def download_enabled(explicit: bool | None = None) -> bool:
    """Tell whether missing model files may be downloaded: yes unless ``explicit`` is False or an off switch is set."""
    return _download_blocker(explicit) is None


def resolve_url(url: str, mirror: str | None = None) -> str:
    """Swap the scheme and host of ``url`` for ``mirror`` (or $TRIDENT_DOWNLOAD_MIRROR, $HF_ENDPOINT for HF URLs)."""
    parts = urlsplit(url)
    base = mirror or os.environ.get("TRIDENT_DOWNLOAD_MIRROR")
    if not base and parts.netloc == "huggingface.co":
        base = os.environ.get("HF_ENDPOINT")
    if not base:
        return url
    return base.rstrip("/") + urlunsplit(("", "", parts.path, parts.query, ""))


def stderr_progress(label: str, interval: float = 1.0) -> ProgressFn:
    """Return a progress callback that prints at most one line per ``interval`` seconds to stderr, plus the last."""
    last: float | None = None

    def report(done: int, total: int | None) -> None:
        nonlocal last
        now = time.monotonic()
        finished = total is not None and done >= total
        if not finished and last is not None and now - last < interval:
            return
        last = now
        text = f"[trident] {label}: {done / 2**20:.1f} MiB"
        if total:
            text += f" / {total / 2**20:.1f} MiB ({100 * done // total}%)"
        print(text, file=sys.stderr, flush=True)

    return report


def _fetch(url: str, out: BinaryIO, expected_size: int | None, sha256: str | None, report: ProgressFn,
           timeout: float) -> int:
    """Stream ``url`` into ``out`` and return the byte count; raise DownloadError on any transfer or integrity fault."""
    digest = hashlib.sha256()
    done = 0
    total = expected_size
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            kind = response.headers.get("Content-Type", "")
            if kind.split(";")[0].strip().lower() in {"text/html", "application/xhtml+xml"}:
                raise DownloadError(f"Download of {url} failed: the server sent a web page ({kind}) instead of the "
                                    "file (a login, error or consent page?)")
            length = response.headers.get("Content-Length")
            if length is not None:
                total = int(length)
                if expected_size is not None and total != expected_size:
                    raise DownloadError(f"Download of {url} failed: the server announces {total} bytes, "
                                        f"expected {expected_size}")
            report(0, total)
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if total is not None and done > total:
                    raise DownloadError(f"Download of {url} failed: received more than the expected {total} bytes")
                report(done, total)
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise DownloadError(f"Download of {url} failed: the server redirects in a loop or too many times "
                                f"(HTTP {exc.code})") from exc
        raise DownloadError(f"Download of {url} failed: HTTP {exc.code} {' '.join(str(exc.reason).split())}") from exc
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise DownloadError(f"Download of {url} failed after {done} bytes: {type(exc).__name__}: {exc}") from exc
    if total is not None and done != total:
        raise DownloadError(f"Download of {url} failed: truncated, received {done} of {total} bytes")
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise DownloadError(f"Download of {url} failed: SHA-256 is {digest.hexdigest()}, expected {sha256.lower()}")
    return done


def _install(tmp: Path, dest: Path, size: int) -> None:
    """Rename the verified ``tmp`` onto ``dest``; accept a same-size copy that another process put there meanwhile."""
    try:
        os.replace(tmp, dest)
    except OSError as exc:  # Windows refuses to replace a file another process holds open.
        if not (dest.is_file() and dest.stat().st_size == size):
            raise DownloadError(f"Could not move the downloaded {tmp} to {dest}: {exc}") from exc
        tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists (POSIX; elsewhere unknown, so True and only the file's age counts)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # it exists but belongs to another user; or no process number at all (not a file of ours)
    return True


def remove_abandoned_temporaries(folder: Path) -> None:
    """Delete the temporary files of downloads that were killed (SIGKILL, power loss): those whose process is
    gone and that nobody wrote to for five minutes, or for an hour whatever their process. A live download's file
    is kept, also one of another container sharing the folder (whose process this one cannot see)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP.match(entry.name)
        try:
            idle = time.time() - entry.stat().st_mtime if match else 0.0
            if match and (idle > _STALE_AFTER or idle > _UNSEEN_AFTER and not _process_alive(int(match.group(1)))):
                entry.unlink()
                logger.info("Removed %s, left by an interrupted download", entry)
        except OSError:
            continue  # removed meanwhile by another process, or not ours to remove


def writable_folder(folders: list[Path]) -> Path:
    """The first of `folders` a download can go into (one that is there and writable, or can be made), else the
    first (whose error then says what is wrong)."""
    for folder in folders:
        if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
            return folder
        if not folder.exists() and not folder.is_symlink():
            ancestor = next((p for p in folder.parents if p.exists()), None)
            if ancestor is not None and ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK):
                return folder
    return folders[0]


def prepare_folder(folder: Path) -> None:
    """Create the download folder, with one clear error when that is impossible (e.g. the path is a file)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "is a file, not a folder" if folder.is_file() else f"cannot be created ({exc.strerror or exc})"
        raise FolderNotWritable(f"The model folder {folder} {what}: point TRIDENT_CACHE (or the folder setting) at "
                                "a folder you can write, or remove what is in the way.") from exc


def download(url: str, dest: str | os.PathLike[str], expected_size: int | None = None, sha256: str | None = None,
             progress: ProgressFn | None = None, timeout: float = 30.0,
             check: Callable[[Path], None] | None = None) -> Path:
    """Fetch ``url`` to ``dest`` via a verified temp file and an atomic rename, so no partial file ever appears.

    ``timeout`` bounds each network wait in seconds; ``progress`` gets ``(done_bytes, total_bytes_or_None)`` and
    defaults to a throttled line on stderr; ``check(temp_path)`` may inspect the complete file before the rename and
    raise :class:`DownloadError`. Any failure removes the temp file; transfer and integrity faults raise
    :class:`DownloadError`, anything else (KeyboardInterrupt, an exception from ``progress``) propagates unchanged.
    """
    dest = Path(dest)
    prepare_folder(dest.parent)
    remove_abandoned_temporaries(dest.parent)
    report = progress or stderr_progress(dest.name)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        try:
            out = open(tmp, "xb")
        except OSError as exc:
            raise FolderNotWritable(f"The model folder {dest.parent} cannot be written ({exc.strerror or exc}): point "
                                "TRIDENT_CACHE (or the folder setting) at a folder you can write, or put "
                                f"{dest.name} there by hand.") from exc
        with out:
            size = _fetch(url, out, expected_size, sha256, report, timeout)
            out.flush()
            os.fsync(out.fileno())
        if check is not None:
            check(tmp)
        _install(tmp, dest, size)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _family_check(record: ModelFile, url: str) -> Callable[[Path], None]:
    """A check that the arrived file is a readable checkpoint of `record`'s model (not a web page, a cut-short
    file or another model)."""

    def check(tmp: Path) -> None:
        from .checkpoints import FAMILY_FILES, CheckpointError, identify, read_state_dict

        with open(tmp, "rb") as f:
            head = f.read(512).lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
            raise DownloadError(f"Download of {url} failed: the server sent a web page instead of {record.filename}")
        try:
            found = identify(read_state_dict(tmp))
        except CheckpointError as exc:
            raise DownloadError(f"Download of {url} failed: what arrived ({tmp.stat().st_size} bytes) cannot be "
                                "read as a checkpoint: it is cut short or corrupt") from exc
        if found != record.role:
            raise DownloadError(f"Download of {url} failed: what arrived is not {FAMILY_FILES[record.role]} (its "
                                f"tensors are those of {found if found != 'unknown' else 'no known model'})")

    return check


def _by_hand(record: ModelFile) -> str:
    """Where to get a known file by hand and the name to save it under (a URL's own name may differ)."""
    url = record.urls[0]
    named = "" if url.rsplit("/", 1)[-1] == record.filename else f", save it as {record.filename}"
    return f"Download it by hand from {url}{named} and put it in that folder"


def ensure_file(name_or_filename: str, folder: str | os.PathLike[str], allow_download: bool | None = None,
                progress: ProgressFn | None = None, mirror: str | None = None, role: Role | None = None) -> Path:
    """Return the path of a model file in ``folder``, first downloading a known one if it is missing and allowed.

    ``name_or_filename`` is a :data:`MODELS` key or a filename; ``mirror`` is passed to :func:`resolve_url`;
    ``role``, where given, refuses a known file of another model before anything is downloaded.
    Raises :class:`ModelFileMissing` when the file is absent and cannot or may not be downloaded, and
    :class:`DownloadError` when every source failed.
    """
    folder = Path(folder)
    record = find_model(name_or_filename)
    path = folder / (record.filename if record else name_or_filename)
    if record is not None and role is not None and record.role != role:
        raise ModelFileMissing(f"{record.filename} is {record.description}, not a {role.upper()} model: give a "
                               f"{role.upper()} file, e.g. {DEFAULT_FILES[role]}")
    if path.is_file():
        remove_abandoned_temporaries(folder)
        return path
    if path.is_symlink():
        raise ModelFileMissing(f"{path} is a link to {os.readlink(path)}, which is not a file (a drive not mounted?): "
                               "make it reachable, or remove the link to download the file")
    if folder.exists() and not folder.is_dir():
        raise ModelFileMissing(f"The model folder {folder} is a file, not a folder, so {path.name} cannot be there: "
                               "point TRIDENT_CACHE (or the folder setting) at a folder, or remove that file.")
    if record is None:
        raise ModelFileMissing(f"Model file {path.name} is not in {folder}, and it is not a known model file, so it "
                               f"cannot be downloaded automatically: put it in that folder by hand. Known files: "
                               f"{', '.join(sorted(m.filename for m in MODELS.values()))}")
    blocker = _download_blocker(allow_download)
    if blocker is not None:
        raise ModelFileMissing(f"Model file {record.filename} ({record.description}) is not in {folder}. "
                               f"{_by_hand(record)}, or allow automatic download "
                               f"({blocker}; enable the download option and unset "
                               f"{' / '.join(_OFF_SWITCHES)}).")
    failures = []
    for url in record.urls:
        source = resolve_url(url, mirror)
        logger.info("Downloading %s from %s into %s", record.filename, source, folder)
        try:
            return download(source, path, record.size, record.sha256, progress, check=_family_check(record, source))
        except FolderNotWritable:
            raise  # (the same for every source: one line, not "could not download" around it)
        except DownloadError as exc:
            logger.warning("%s", exc)
            failures.append(str(exc))
    raise DownloadError(f"Could not download {record.filename} into {folder}: {' | '.join(failures)}. "
                        f"{_by_hand(record)}.")
