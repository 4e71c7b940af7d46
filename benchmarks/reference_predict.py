#!/usr/bin/env python
"""The reference's `Trident.predict` timed back to back, through the reference harness's own set-up.

Runs ../shared/reference-harness/run_reference.py (its patches, checkpoints, class file and data pipeline, none of
the reference's code copied) with one change: once the harness has loaded the reference's trident.py, its
`Trident.predict` is wrapped so that the harness's single call runs it `--warmup + --repeat` times on the same
inputs and records each call's wall time. The harness then saves its outputs as usual (from the last call).

    python benchmarks/reference_predict.py --repeat 3 --times-json T.json -- --image IMG --classes FILE \\
        --preset voc21 --no-sam-refine --ckpt-dir /tmp/trident_ckpt --out /tmp/ref.npz --no-stage-peaks

Writes {"warmup_s": [...], "predict_s": [...]} to --times-json (and prints it)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[1].parent / "shared" / "reference-harness"


def wrap_predict(cls, warmup: int, repeat: int, times: dict) -> None:
    """Make `cls.predict` run warmup + repeat times, timing each call."""
    original = cls.predict

    def predict(self, *args, **kwargs):
        out = None
        for i in range(warmup + repeat):
            t0 = time.perf_counter()
            out = original(self, *args, **kwargs)
            seconds = time.perf_counter() - t0
            times["warmup_s" if i < warmup else "predict_s"].append(round(seconds, 3))
            print(f"reference predict call {i + 1}/{warmup + repeat}: {seconds:.2f} s", file=sys.stderr, flush=True)
        return out

    cls.predict = predict


def hook_reference_module(warmup: int, repeat: int, times: dict) -> None:
    """Wrap Trident.predict right after the harness executes the reference's trident.py."""
    original_spec = importlib.util.spec_from_file_location

    def spec_from_file_location(name, *args, **kwargs):
        spec = original_spec(name, *args, **kwargs)
        if name == "trident" and spec is not None:
            exec_module = spec.loader.exec_module

            def exec_and_wrap(module):
                exec_module(module)
                wrap_predict(module.Trident, warmup, repeat, times)

            spec.loader.exec_module = exec_and_wrap
        return spec

    importlib.util.spec_from_file_location = spec_from_file_location


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harness", default=os.environ.get("TRIDENT_REF_HARNESS", str(HARNESS)))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--times-json", required=True)
    ap.add_argument("harness_args", nargs=argparse.REMAINDER, help="-- then run_reference.py's arguments")
    args = ap.parse_args()
    rest = args.harness_args[1:] if args.harness_args[:1] == ["--"] else args.harness_args
    sys.path.insert(0, args.harness)
    import run_reference

    times: dict = {"warmup_s": [], "predict_s": []}
    hook_reference_module(args.warmup, args.repeat, times)
    run_reference.main(rest)
    if len(times["predict_s"]) != args.repeat:
        raise SystemExit(f"the harness did not run Trident.predict through the hook ({times})")
    Path(args.times_json).write_text(json.dumps(times))
    print(json.dumps(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
