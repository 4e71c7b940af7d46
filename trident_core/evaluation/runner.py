"""Run a segmenter over a validation set, sharded over torchrun ranks, resumable, with mmseg-exact metrics.

Rank ``r`` of ``W`` takes images ``r, r+W, r+2W, ...``; each keeps an int64 confusion matrix that is saved
atomically (with the indices done) every few images and on exit, so a restarted run with the same arguments
skips what is done and ends with the same numbers. At the end the matrices are summed with ``all_reduce``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import jsonfile
from ..atomic import atomic_file, write_atomic
from ..paths import require_output_file
from ..zip_head import leading_text
from .datasets import Sample, SegDataset, load_image_rgb
from .distributed import all_reduce, rank_and_world
from .metrics import IGNORE_INDEX, compute_metrics, confusion_matrix, format_table, percent

Predict = Callable[[np.ndarray], np.ndarray]


def evaluate(
    predict: Predict,
    dataset: Sequence[Sample],
    num_classes: int | None = None,
    *,
    limit: int | None = None,
    progress: bool = True,
    result_json: str | os.PathLike[str] | None = None,
    resume: bool = True,
    save_every: int = 20,
    class_names: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
    ignore_index: int = IGNORE_INDEX,
    about: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``predict(rgb HxWx3 uint8) -> HxW class indices`` on ``dataset``; returns the result dict.

    ``num_classes``/``class_names`` default to the dataset's when it is a :class:`SegDataset`. ``limit`` keeps
    the first images only. With ``result_json`` rank 0 writes the result there, and every rank keeps a state file
    ``<name>.state-rank<r>of<W>.npz`` beside it that ``resume`` continues from (a finished run's too: its rerun
    prints the result again, saying so); ``config`` (JSON-able settings of the segmenter) is stored in both, and a
    state written under another config, image list or dataset (its folder, its files' sizes and times) is refused;
    ``about`` (JSON-able, e.g. the model files' paths) is written into the result only.
    Rank and world size come from ``torch.distributed`` when it is initialised. Every rank returns the result.
    """
    rank, world = rank_and_world()
    seg = dataset if isinstance(dataset, SegDataset) else None
    num_classes = num_classes if num_classes is not None else (seg.num_classes if seg else None)
    if num_classes is None:
        raise ValueError("num_classes is required when the dataset is not a SegDataset")
    if class_names is None:
        class_names = seg.classes if seg else [str(i) for i in range(num_classes)]
    names = tuple(class_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (no images give no metrics), got {limit}")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    total = len(dataset) if limit is None else min(limit, len(dataset))
    preset = seg.name if seg else "custom"
    meta = {
        "preset": preset,
        "num_classes": num_classes,
        "num_images": total,
        "world_size": world,
        "images_sha1": hashlib.sha1("\n".join(seg.names[:total]).encode()).hexdigest() if seg else None,
        "data_root": str(seg.root) if seg else None,
        "files_sha1": _files_digest([*seg.image_paths[:total], *seg.label_paths[:total]]) if seg else None,
        "config": json.dumps(config, sort_keys=True),
    }

    out = Path(result_json) if result_json is not None else None
    if out is not None:
        require_output_file(out, "result_json (--out)")
        check_outputs_free(out, rank, world)
    state = _State(out, rank, world, meta) if out else None
    empty = np.zeros((num_classes, num_classes + 1), np.int64)
    # (confusion, indices done) is swapped as one object: an interrupt can never save one without the other.
    tally: tuple[np.ndarray, tuple[int, ...]] = (empty, ())
    predict_s = 0.0
    if state and resume:
        tally, predict_s = state.load(empty)
        if tally[1]:
            print(f"resumed: {len(tally[1])} of the {len(range(rank, total, world))} images"
                  + (f" of rank {rank}/{world}" if world > 1 else "")
                  + f" from {state.path} (--no-resume evaluates them again)", file=sys.stderr, flush=True)
    elif state:
        state.discard()
    mine = range(rank, total, world)
    already = set(tally[1])
    todo = [i for i in mine if i not in already]
    tag = preset + (f" rank {rank}/{world}" if world > 1 else "")
    start = time.perf_counter()
    try:
        for count, index in enumerate(todo, 1):
            sample = dataset[index]
            image = load_image_rgb(sample.image_path)
            t0 = time.perf_counter()
            pred = np.asarray(predict(image))
            predict_s += time.perf_counter() - t0
            if pred.shape != sample.label.shape:
                raise ValueError(f"{sample.name}: prediction shape {pred.shape} != label shape {sample.label.shape}")
            try:
                counts = confusion_matrix(pred, sample.label, num_classes, ignore_index)
            except ValueError as e:  # (which image: a dataset has thousands)
                where = seg.label_paths[index] if seg else sample.name
                raise ValueError(f"{where}: {e}") from None
            tally = (tally[0] + counts, (*tally[1], index))
            if state and count % save_every == 0:
                state.save(*tally, predict_s)
            if progress:
                _report(tag, len(tally[1]), len(mine), count, len(todo) - count, time.perf_counter() - start)
    finally:
        if state:
            state.save(*tally, predict_s)
    wall = time.perf_counter() - start
    conf, done = tally

    conf = all_reduce(conf)
    n_done, n_new, predict_total = all_reduce(np.array([len(done), len(todo), predict_s], np.float64))
    wall = float(all_reduce(np.array([wall], np.float64), op="max")[0])
    if int(n_done) != total:
        raise RuntimeError(f"ranks report {int(n_done)} images done, expected {total}")
    if not conf.any():  # (every metric would be NaN: no number to report)
        raise ValueError(f"no labelled pixel in the {total} label maps (every value is the ignored {ignore_index}"
                         + (", or 0 under this preset's reduce_zero_label" if seg and seg.preset.reduce_zero_label
                            else "") + "): check the label files and --preset")

    metrics = compute_metrics(conf)
    result: dict[str, Any] = {
        "preset": preset,
        "dataset_root": str(seg.root) if seg else None,
        "num_images": total,
        # every image of the published split, all of them evaluated (comparable numbers; not with --limit)
        "official_split": (seg.official and total == len(seg)) if seg else None,
        "num_classes": num_classes,
        "classes": list(names),
        "mIoU": percent(metrics.miou),
        "aAcc": percent(metrics.aacc),
        "mAcc": percent(metrics.macc),
        "IoU": [percent(v) for v in metrics.iou],
        "Acc": [percent(v) for v in metrics.acc],
        "confusion_matrix": conf.tolist(),
        "world_size": world,
        "config": dict(config) if config is not None else None,
        **(dict(about) if about else {}),
        "timings": {
            "wall_s": round(wall, 3),
            "images_this_run": int(n_new),
            "images_per_s": round(n_new / wall, 4) if wall > 0 else None,
            "predict_s_per_image": round(predict_total / total, 4) if total else None,
        },
    }
    if rank == 0:
        print(f"{preset}: {total} images\n{format_table(metrics, names)}", flush=True)
        if out:
            write_atomic(out, json.dumps(result, indent=1).encode())
    return result


def check_outputs_free(out: Path, rank: int = 0, world: int = 1) -> None:
    """Refuse a result file, or this rank's resume state beside it, that is there and not one an evaluation wrote
    (a file of the user's under that name would be replaced)."""
    if os.path.lexists(out) and not _is_result(out):
        raise ValueError(f"--out {out} is there and is not a result Trident's eval wrote: move it away or choose "
                         "another file name")
    state = _State.path_of(out, rank, world)
    if os.path.lexists(state) and not (_is_state(state) or _ours_cut_short(state)):
        raise ValueError(f"{state} (where eval keeps its resume state for --out {out}) is there and is not a state "
                         "Trident wrote: move it away or choose another --out")


def _is_result(path: Path) -> bool:
    """Whether `path` is a regular file holding a result JSON as `evaluate` writes it."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        data = jsonfile.read(path)
    except jsonfile.JsonFileError:
        return False
    return isinstance(data, dict) and {"preset", "num_images", "mIoU", "confusion_matrix"} <= data.keys()


class _State:
    """One rank's resumable progress, kept in ``<name>.state-rank<r>of<W>.npz`` beside the result JSON (its whole
    name: ``r.json`` and ``r.txt`` keep separate states)."""

    def __init__(self, out: Path, rank: int, world: int, meta: dict[str, Any]) -> None:
        self.out, self.rank, self.world, self.meta = out, rank, world, meta
        self.path = self.path_of(out, rank, world)

    @staticmethod
    def path_of(out: Path, rank: int, world: int) -> Path:
        """Where rank `rank` of `world` keeps its state for the result file `out`."""
        return out.with_name(f"{out.name}.state-rank{rank}of{world}.npz")

    def _others(self) -> list[Path]:
        """State files of ``out`` written by runs with another number of processes (files of that name pattern
        that are not such a state, e.g. a user's, are not ours and are left alone)."""
        pattern = re.compile(rf"{re.escape(self.out.name)}\.state-rank\d+of(\d+)\.npz")
        return [p for p in self.out.parent.iterdir() if (m := pattern.fullmatch(p.name)) and int(m[1]) != self.world
                and _is_state(p)]

    def load(self, empty: np.ndarray) -> tuple[tuple[np.ndarray, tuple[int, ...]], float]:
        """((confusion, indices done), predict seconds) saved by an interrupted identical run, else a fresh start
        (also, with a line saying so, when the state file is damaged or not one this code writes)."""
        others = self._others()
        if others:
            raise ValueError(
                f"resume state {others[0]} was written by a run with another number of processes; rerun with "
                "that number, or pass --no-resume to start over"
            )
        if not os.path.lexists(self.path):
            return (empty, ()), 0.0
        try:
            saved, confusion, done, predict_s = self._read(empty)
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
            print(f"resume state {self.path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                  "starting over", file=sys.stderr, flush=True)
            return (empty, ()), 0.0
        diff = sorted(k for k in self.meta if saved.get(k) != self.meta[k])
        if "config" in diff:  # name the settings that changed (e.g. a model file's content)
            old, new = _config(saved.get("config")), _config(self.meta["config"])
            keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
            diff[diff.index("config")] = f"config: {', '.join(keys)}"
        if diff:
            raise ValueError(
                f"resume state {self.path} is from a different run ({', '.join(_DIFFERENCES.get(k, k) for k in diff)}"
                " differ); rerun with the same arguments, or pass --no-resume to start over"
            )
        if any(i >= self.meta["num_images"] for i in done):  # (the same run's meta, yet images beyond its count)
            print(f"resume state {self.path} is damaged (it lists images beyond the run's {self.meta['num_images']});"
                  " starting over", file=sys.stderr, flush=True)
            return (empty, ()), 0.0
        return (confusion, done), predict_s

    def _read(self, empty: np.ndarray) -> tuple[dict, np.ndarray, tuple[int, ...], float]:
        """The state file's contents, each checked to be what `save` writes (ValueError otherwise)."""
        if not _is_state(self.path, max_member=max(1 << 20, 2 * empty.nbytes + 4096)):
            raise ValueError("not a resume state of this program")
        with np.load(self.path, allow_pickle=False) as data:
            saved = jsonfile.parse(str(data["meta"]))
            confusion, done, predict_s = data["confusion"], data["done"], data["predict_s"]
        if not isinstance(saved, dict):
            raise ValueError("its settings are not a JSON object")
        if confusion.shape != empty.shape or confusion.dtype.kind not in "iu" or (confusion < 0).any():
            raise ValueError("its confusion matrix is not counts of the expected size")
        if (done.ndim != 1 or done.dtype.kind not in "iu" or len(np.unique(done)) != len(done) or (done < 0).any()
                or (done % self.world != self.rank).any()):  # (its range is checked once its run is known the same)
            raise ValueError("its list of images done is not this process's share")
        if predict_s.shape != () or not np.isfinite(predict_s) or predict_s < 0:
            raise ValueError("its timing is not a duration")
        return saved, confusion.astype(np.int64), tuple(int(i) for i in done), float(predict_s)

    def discard(self) -> None:
        """Start over: delete this rank's state and (rank 0) states of runs with another number of processes."""
        if _is_state(self.path):
            self.path.unlink()
        if self.rank == 0:
            for path in self._others():
                path.unlink(missing_ok=True)

    def save(self, confusion: np.ndarray, done: Sequence[int], predict_s: float) -> None:
        """Atomically replace the state file with the current progress."""
        with atomic_file(self.path) as f:
            np.savez(  # meta first: what is left of a state cut short still proves it ours (`_ours_cut_short`)
                f,
                meta=np.array(json.dumps(self.meta, sort_keys=True)),
                confusion=confusion,
                done=np.asarray(done, np.int64),
                predict_s=np.float64(predict_s),
            )


_STATE_MEMBERS = {"confusion.npy", "done.npy", "predict_s.npy", "meta.npy"}


def _is_state(path: Path, max_member: int | None = None) -> bool:
    """Whether `path` is a resume state as `_State.save` writes it (an uncompressed npz of exactly its members, each
    at most `max_member` bytes when given): what may be read back or deleted."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False
    return ({i.filename for i in infos} == _STATE_MEMBERS and all(i.compress_type == zipfile.ZIP_STORED for i in infos)
            and (max_member is None or all(i.file_size <= max_member for i in infos)))


def _ours_cut_short(path: Path) -> bool:
    """Whether `path` begins as a state `_State.save` writes (its meta, first, a JSON object with the run's keys):
    a damaged state of ours, which `load` reports and starts over from."""
    if not path.is_file() or path.is_symlink():
        return False
    meta = leading_text(path, "meta.npy")
    if meta is None:
        return False
    try:
        saved = jsonfile.parse(meta)
    except jsonfile.JsonFileError:
        return False
    return isinstance(saved, dict) and {"preset", "config", "images_sha1"} <= saved.keys()


_DIFFERENCES = {"images_sha1": "image list", "num_images": "num_images (--limit)", "data_root": "--data-root",
                "files_sha1": "image or label files (sizes or modification times)"}


def _files_digest(paths: Sequence[Path]) -> str:
    """SHA-1 of the files' names, sizes and modification times: a label map or image replaced since a state was
    written makes it another run's (reading every file's bytes would take minutes on a dataset)."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _config(text: object) -> dict:
    """A state's config (a JSON object as text) as a dict ({} for anything else)."""
    try:
        value = jsonfile.parse(text) if isinstance(text, str) else None
    except jsonfile.JsonFileError:
        return {}
    return value if isinstance(value, dict) else {}


def _report(tag: str, done: int, share: int, new: int, left: int, elapsed: float) -> None:
    """One progress line on stderr: images done of this rank's share, images/s of this run, ETA."""
    rate = new / elapsed if elapsed > 0 else 0.0
    eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "--:--:--"
    print(f"[eval {tag}] {done}/{share}  {rate:.2f} img/s  ETA {eta}", file=sys.stderr, flush=True)
