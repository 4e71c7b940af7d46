"""Which of two ways of computing the same thing is faster on this machine: timed once per host and shape, the
decision kept on disk (`$TRIDENT_CACHE/kernels/`), and how much each kept trick saved while the process ran.

A trick is used for a shape only where it was measured faster than PyTorch's own path here: the same CPU model
name can run a blocked oneDNN product faster or slower than MKL depending on the host, so no fixed rule decides."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

from ..download import cache_dir

REPEATS = 3


@dataclass
class Decision:
    """A timed choice for one trick and shape: ours_ms / torch_ms per probe call, `work` done through it since."""

    ours_ms: float
    torch_ms: float
    work: float = 0.0  # calls (of the timed size) run through this decision in this process

    @property
    def use_ours(self) -> bool:
        return self.ours_ms < self.torch_ms

    @property
    def saved_s(self) -> float:
        """Seconds this process saved by the decision (0 where PyTorch's path ran)."""
        return self.work * (self.torch_ms - self.ours_ms) / 1000 if self.use_ours else 0.0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def host_key() -> str:
    """The CPU, thread count and PyTorch version the timings hold for."""
    text = f"{_cpu_name()}|{platform.machine()}|{torch.get_num_threads()}|{torch.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_file() -> Path:
    return cache_dir() / "kernels" / f"timings-{host_key()}.json"


_decisions: dict[str, Decision] | None = None


def _load() -> dict[str, Decision]:
    global _decisions
    if _decisions is None:
        try:
            raw = json.loads(_cache_file().read_text(encoding="utf-8"))
            _decisions = {k: Decision(float(v["ours_ms"]), float(v["torch_ms"])) for k, v in raw.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            _decisions = {}
    return _decisions


def quiet() -> bool:
    """Whether the machine runs little besides this process (1-minute load average at most this process's threads
    plus half a core): timings taken on a busy machine mislead (oneDNN's threads suffer most from contention)."""
    try:
        return os.getloadavg()[0] <= torch.get_num_threads() + 0.5
    except OSError:
        return True


def _save(decisions: dict[str, Decision]) -> None:
    """Write the timings taken on a quiet machine (best effort: a read-only cache folder, or a busy machine, only
    costs timing again in the next process)."""
    if not quiet():
        return
    path = _cache_file()
    data = {k: {"ours_ms": d.ours_ms, "torch_ms": d.torch_ms} for k, d in decisions.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _time_both(ours: Callable[[], object], theirs: Callable[[], object]) -> tuple[float, float]:
    """The best of up to REPEATS runs of each after a warm-up, alternating; stops early once one is clearly (1.5x)
    slower, so a slow contender costs the probe little."""
    ours(), theirs()  # warm-up (first-call allocations, JIT kernels)
    t_ours, t_theirs = [_ms(ours)], [_ms(theirs)]
    while len(t_ours) < REPEATS and 1 / 1.5 < min(t_ours) / max(min(t_theirs), 1e-9) < 1.5:
        t_ours.append(_ms(ours))
        t_theirs.append(_ms(theirs))
    return min(t_ours), min(t_theirs)


@torch.no_grad()
def decide(key: str, contenders: Callable[[], tuple[Callable[[], object], Callable[[], object]]]) -> Decision:
    """The decision for `key`; the first time on this host, `contenders()` gives (ours, PyTorch's) to time."""
    decisions = _load()
    if key not in decisions:
        decisions[key] = Decision(*_time_both(*contenders()))
        _save(decisions)
    return decisions[key]


_trials: dict[str, tuple[list[float], list[float]]] = {}
R = TypeVar("R")


def known(key: str) -> Decision | None:
    """The decision for `key` if one was made (in this process or kept on disk)."""
    return _load().get(key)


@torch.no_grad()
def trial(key: str, ours: Callable[[], R], theirs: Callable[[], R]) -> R:
    """A call of an undecided `key` on its real inputs: both ways run and are timed (the first call of each is a
    warm-up), PyTorch's result is returned (the two must be equal). After REPEATS timed calls, or sooner once one is
    clearly (1.5x) slower, the decision is made and kept: timed on real calls, with their cache effects."""
    first = key not in _trials  # the warm-up call
    t_ours, t_theirs = _trials.setdefault(key, ([], []))
    ms_ours = _ms(ours)
    start = time.perf_counter()
    out = theirs()
    ms_theirs = (time.perf_counter() - start) * 1000
    if not first:
        t_ours.append(ms_ours)
        t_theirs.append(ms_theirs)
        clear = not 1 / 1.5 < min(t_ours) / max(min(t_theirs), 1e-9) < 1.5
        if len(t_ours) >= REPEATS or clear:
            decisions = _load()
            decisions[key] = Decision(min(t_ours), min(t_theirs))
            del _trials[key]
            _save(decisions)
    return out


def report() -> list[dict]:
    """Every decision known to this process: trick and shape, both timings, whether ours runs, seconds saved."""
    return [{"key": k, **asdict(d), "use_ours": d.use_ours, "saved_s": d.saved_s}
            for k, d in sorted(_load().items())]


def forget() -> None:
    """Drop the in-memory decisions (tests; the next `decide` reads the disk cache again)."""
    global _decisions
    _decisions = None
    _trials.clear()
