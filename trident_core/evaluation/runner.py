"""Run a segmenter over a validation set, sharded over torchrun ranks, resumable, with mmseg-exact metrics.

Rank ``r`` of ``W`` takes images ``r, r+W, r+2W, ...``; each keeps an int64 confusion matrix that is saved
atomically (with the indices done) every few images and on exit, so a restarted run with the same arguments
skips what is done and ends with the same numbers. At the end the matrices are summed with ``all_reduce``.
"""

from __future__ import annotations

import hashlib
import json
import os
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
) -> dict[str, Any]:
    """Evaluate ``predict(rgb HxWx3 uint8) -> HxW class indices`` on ``dataset``; returns the result dict.

    ``num_classes``/``class_names`` default to the dataset's when it is a :class:`SegDataset`. ``limit`` keeps
    the first images only. With ``result_json`` rank 0 writes the result there, and every rank keeps a state file
    ``<stem>.state-rank<r>of<W>.npz`` beside it that ``resume`` continues from; ``config`` (JSON-able settings
    of the segmenter) is stored in both, and a state written under another config or image list is refused.
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
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
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
        "config": json.dumps(config, sort_keys=True),
    }

    out = Path(result_json) if result_json is not None else None
    if out is not None:
        require_output_file(out, "result_json (--out)")
    state = _State(out, rank, world, meta) if out else None
    empty = np.zeros((num_classes, num_classes + 1), np.int64)
    # (confusion, indices done) is swapped as one object: an interrupt can never save one without the other.
    tally: tuple[np.ndarray, tuple[int, ...]] = (empty, ())
    predict_s = 0.0
    if state and resume:
        tally, predict_s = state.load(empty)
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
            tally = (tally[0] + confusion_matrix(pred, sample.label, num_classes, ignore_index), (*tally[1], index))
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

    metrics = compute_metrics(conf)
    result: dict[str, Any] = {
        "preset": preset,
        "dataset_root": str(seg.root) if seg else None,
        "num_images": total,
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


class _State:
    """One rank's resumable progress, kept in ``<stem>.state-rank<r>of<W>.npz`` beside the result JSON."""

    def __init__(self, out: Path, rank: int, world: int, meta: dict[str, Any]) -> None:
        self.out, self.rank, self.world, self.meta = out, rank, world, meta
        self.path = out.with_name(f"{out.stem}.state-rank{rank}of{world}.npz")

    def _others(self) -> list[Path]:
        """State files of ``out`` written by runs with another number of processes."""
        return [p for p in self.out.parent.glob(f"{self.out.stem}.state-rank*of*.npz")
                if not p.name.endswith(f"of{self.world}.npz")]

    def load(self, empty: np.ndarray) -> tuple[tuple[np.ndarray, tuple[int, ...]], float]:
        """((confusion, indices done), predict seconds) saved by an interrupted identical run, else a fresh start."""
        others = self._others()
        if others:
            raise ValueError(
                f"resume state {others[0]} was written by a run with another number of processes; rerun with "
                "that number, or pass --no-resume to start over"
            )
        if not self.path.is_file():
            return (empty, ()), 0.0
        try:
            with np.load(self.path, allow_pickle=False) as data:
                saved = jsonfile.parse(str(data["meta"]))
                confusion, done, predict_s = data["confusion"], data["done"].tolist(), float(data["predict_s"])
            if not isinstance(saved, dict) or not isinstance(done, list):
                raise ValueError("not a state of ours")
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # (JsonFileError is a ValueError)
            print(f"resume state {self.path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                  "starting over", file=sys.stderr, flush=True)
            return (empty, ()), 0.0
        diff = sorted(k for k in self.meta if saved.get(k) != self.meta[k])
        if "config" in diff:  # name the settings that changed (e.g. a model file's content)
            old, new = json.loads(saved.get("config") or "null") or {}, json.loads(self.meta["config"]) or {}
            keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
            diff[diff.index("config")] = f"config: {', '.join(keys)}"
        if diff:
            raise ValueError(
                f"resume state {self.path} is from a different run ({', '.join(diff)} differ); "
                "rerun with the same arguments, or pass --no-resume to start over"
            )
        if confusion.shape != empty.shape or any(i % self.world != self.rank for i in done):
            raise ValueError(f"resume state {self.path} is inconsistent; pass --no-resume to start over")
        return (confusion.astype(np.int64), tuple(done)), predict_s

    def discard(self) -> None:
        """Start over: delete this rank's state and (rank 0) states of runs with another number of processes."""
        self.path.unlink(missing_ok=True)
        if self.rank == 0:
            for path in self._others():
                path.unlink(missing_ok=True)

    def save(self, confusion: np.ndarray, done: Sequence[int], predict_s: float) -> None:
        """Atomically replace the state file with the current progress."""
        with atomic_file(self.path) as f:
            np.savez(
                f,
                confusion=confusion,
                done=np.asarray(done, np.int64),
                predict_s=np.float64(predict_s),
                meta=np.array(json.dumps(self.meta, sort_keys=True)),
            )


def _report(tag: str, done: int, share: int, new: int, left: int, elapsed: float) -> None:
    """One progress line on stderr: images done of this rank's share, images/s of this run, ETA."""
    rate = new / elapsed if elapsed > 0 else 0.0
    eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "--:--:--"
    print(f"[eval {tag}] {done}/{share}  {rate:.2f} img/s  ETA {eta}", file=sys.stderr, flush=True)
