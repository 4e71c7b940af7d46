"""benchmarks/video.py's own logic: target verdicts on made-up numbers, and its choice of clips."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "video.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_video", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


video = _load()


def _clip(flicker: float, smoothed: float, seg: float = 5.0, extra: float = 0.2, same: bool = True) -> dict:
    return {"flicker": flicker, "flicker_smoothed": smoothed, "segment_s": seg, "extra_s": extra,
            "first_frame_unchanged": same}


def _measurements() -> dict:
    return {"tracking": {"total": {"switches": 0, "returns": 5, "refound": 5}},
            "flicker": {f"c{i}": _clip(0.3, 0.06) for i in range(8)},
            "memory": {"8": {"frames": 8, "peak_mb": 2000.0}, "96": {"frames": 96, "peak_mb": 2100.0}}}


def _status(m: dict) -> list[str]:
    return [r["status"] for r in video.targets(m)]


def test_targets_on_made_up_numbers():
    m = _measurements()
    rows = video.targets(m)
    assert _status(m) == ["PASS"] * 6
    assert abs(rows[2]["value"] - 0.2) < 1e-9 and abs(rows[4]["value"] - 0.04) < 1e-9 and rows[5]["value"] == 100
    m["tracking"]["total"] |= {"switches": 1, "refound": 4}
    m["flicker"]["c0"] = _clip(0.3, 0.3, same=False)  # mean ratio (1 + 7 x 0.2) / 8 = 0.3: still within 1/3
    m["memory"]["96"]["peak_mb"] = 2151.0
    assert _status(m) == ["FAIL", "FAIL", "PASS", "FAIL", "PASS", "FAIL"]
    m["flicker"] = {f"c{i}": _clip(0.3, 0.12, extra=0.6) for i in range(8)}
    assert _status(m)[2:5] == ["FAIL", "PASS", "FAIL"]
    m["flicker"] = {f"c{i}": _clip(0.3, 0.06) for i in range(7)}  # fewer than 8 clips
    assert _status(m)[2] == "FAIL"


def test_targets_not_measured_are_not_applicable():
    assert _status({}) == ["n/a"] * 6
    video.print_table(video.targets({}))
