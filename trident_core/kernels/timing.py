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

from .. import caches, jsonfile
from ..atomic import write_atomic
from ..download import cache_dir

REPEATS = 3
BUSY_CORES = 0.5  # other processes' average load above which timings are not kept
JUDGE_AFTER_S = 1.0  # the shortest stretch whose CPU clocks tell that load apart (10 ms ticks)


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
        _decisions = _read(_cache_file())
    return _decisions


def _read(path: Path) -> dict[str, Decision]:
    """The decisions kept in `path`: entries that are not two positive timings are dropped, a damaged file is a
    logged miss (timed again)."""
    if not os.path.lexists(path):
        return {}
    try:
        raw = jsonfile.read_dict(path)
    except jsonfile.JsonFileError as e:
        caches.miss("kernel timings", str(path), e)
        return {}
    return {k: Decision(float(v["ours_ms"]), float(v["torch_ms"])) for k, v in raw.items()
            if isinstance(v, dict) and all(isinstance(v.get(t), (int, float)) and not isinstance(v.get(t), bool)
                                           and 0 < v[t] < 1e9 for t in ("ours_ms", "torch_ms"))}


@dataclass(frozen=True)
class Usage:
    """A reading of the clocks that tell whether other processes ran: wall time, the CPU seconds every process spent
    on this process's CPUs (None where /proc/stat is missing) and this process's own CPU seconds."""

    wall: float
    all_cpu: float | None
    own_cpu: float


def usage() -> Usage:
    """The clocks now (Linux's /proc/stat for every process, summed over the CPUs this process may run on)."""
    wall, own = time.monotonic(), time.process_time()
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        busy, seen = 0, 0
        with open("/proc/stat") as f:
            for line in f:
                name, *ticks = line.split()
                if name in cpus:  # user nice system idle iowait irq softirq steal (guest is within user)
                    busy += sum(int(t) for t in ticks[:8]) - int(ticks[3]) - int(ticks[4])
                    seen += 1
        if seen != len(cpus):  # CPUs numbered otherwise than the affinity (a container's view): no reading
            return Usage(wall, None, own)
        return Usage(wall, busy / os.sysconf("SC_CLK_TCK"), own)
    except (OSError, AttributeError, ValueError, IndexError):
        return Usage(wall, None, own)


def others_cores(start: Usage, end: Usage) -> float | None:
    """How many cores other processes (and the hypervisor, as steal) kept busy on average between two readings."""
    if start.all_cpu is None or end.all_cpu is None or end.wall <= start.wall:
        return None
    return max(0.0, (end.all_cpu - start.all_cpu) - (end.own_cpu - start.own_cpu)) / (end.wall - start.wall)


def quiet(since: Usage) -> bool:
    """Whether timings taken since `since` can be trusted: other processes kept at most half a core busy meanwhile
    (oneDNN's threads suffer most from contention). Without /proc/stat, the 1-minute load average stands in: at most
    this process's threads plus half a core."""
    now = usage()
    cores = others_cores(since, now)
    if cores is not None and now.wall - since.wall >= JUDGE_AFTER_S:
        return cores <= BUSY_CORES
    try:
        return os.getloadavg()[0] <= torch.get_num_threads() + BUSY_CORES
    except (OSError, AttributeError):  # (Windows has no load average)
        return True


_since: Usage | None = None  # when the first timing not yet judged began
_unjudged: set[str] = set()  # keys timed since then
_noisy: set[str] = set()  # keys timed while other processes were busy: used by this process, never kept


def _timing_starts() -> None:
    global _since
    if _since is None:
        _since = usage()


def _timed(key: str) -> None:
    """`key` was just timed: it is kept on disk once the stretch of time it was timed in is judged quiet."""
    _unjudged.add(key)
    _settle()


def flush() -> None:
    """Judge and keep what was timed last, however short the stretch since (the load average judges a stretch too
    short for the CPU clocks); the command line calls it before it ends."""
    if _unjudged:
        _settle(final=True)


def _settle(final: bool = False) -> None:
    """Judge the timings taken since `_since` once the stretch is long enough (JUDGE_AFTER_S) for the CPU clocks'
    10 ms ticks, and write the quiet ones (best effort: a read-only cache folder only costs timing again later)."""
    global _since
    if _since is None or (not final and time.monotonic() - _since.wall < JUDGE_AFTER_S):
        return
    keep = quiet(_since)
    if not keep:
        _noisy.update(_unjudged)
    _since = None
    _unjudged.clear()
    if not keep:
        return
    path = _cache_file()
    data = {k: {"ours_ms": d.ours_ms, "torch_ms": d.torch_ms} for k, d in _load().items() if k not in _noisy}
    try:
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())
    except OSError as e:
        caches.miss("kernel timings", str(path.parent), e)


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
        _timing_starts()
        decisions[key] = Decision(*_time_both(*contenders()))
        _timed(key)
    return decisions[key]


_trials: dict[str, tuple[list[float], list[float]]] = {}
R = TypeVar("R")


def known(key: str) -> Decision | None:
    """The decision for `key` if one was made (in this process or kept on disk). Called for every product, it also
    keeps the timings once the stretch they were taken in can be judged."""
    if _unjudged:
        _settle()
    return _load().get(key)


@torch.no_grad()
def trial(key: str, ours: Callable[[], R], theirs: Callable[[], R]) -> R:
    """A call of an undecided `key` on its real inputs: both ways run and are timed (the first call of each is a
    warm-up), PyTorch's result is returned (the two must be equal). After REPEATS timed calls, or sooner once one is
    clearly (1.5x) slower, the decision is made and kept: timed on real calls, with their cache effects."""
    first = key not in _trials  # the warm-up call
    _timing_starts()
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
            _timed(key)
    return out


def report() -> list[dict]:
    """Every decision known to this process: trick and shape, both timings, whether ours runs, seconds saved."""
    return [{"key": k, **asdict(d), "use_ours": d.use_ours, "saved_s": d.saved_s}
            for k, d in sorted(_load().items())]


def forget() -> None:
    """Drop the in-memory decisions (tests; the next `decide` reads the disk cache again)."""
    global _decisions, _since
    _decisions = _since = None
    _trials.clear()
    _unjudged.clear()
    _noisy.clear()
