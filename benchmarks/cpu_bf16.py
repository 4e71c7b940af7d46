#!/usr/bin/env python
"""Issue #23's targets: `--precision bf16` against fp32 on the CPU, the command line in fresh processes, back to back.

First each precision runs once on one image, making its caches (text embeddings, kernel timings; bf16 converts
the weights once per file): its peak is the first run's. Then for each case (voc21 on 1024x1024 without refinement,
context59 on 1024x1024 with refinement, city_scapes on 2048x1024 with its 1x2 SAM tiles) and each precision (fp32
first, then bf16), `python -m trident_core segment` runs
on --images distinct images with the preset's class list and `--save-npz` (a fresh process; its peak resident
memory is the child's ru_maxrss). Agreement: bf16's labels against fp32's, pixel for pixel, and the largest
difference of the class probabilities (and of the coarse ones before refinement), over every image of the case.
Speed: voc21 runs --rounds more times per precision, the precisions alternating (fp32, bf16, fp32, ...), without
`--save-npz` (writing the raw arrays costs both precisions the same seconds) and with the text-embedding cache
warm: its per-image time is read from the arrival of its progress lines, after the first image
(benchmarks/many_images.py), its wall time is the whole process. Each precision's figure is its fastest round (a
shared host's neighbours only ever slow a run down; alternating gives both precisions the same stretches of time).

    python benchmarks/cpu_bf16.py [--ckpt-dir DIR] [--images 3] [--rounds 3] [--cases voc21,context59,city_scapes]
                                  [--json F]

Run it alone on the machine (`flock /work/.heavy.lock` here): the two precisions are compared by wall time."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from many_images import FILES, ROOT, make_images, parse_cli, print_table, run_process  # noqa: E402

CASES = {"voc21": ((1024, 1024), False), "context59": ((1024, 1024), True), "city_scapes": ((1024, 2048), False)}
PRECISIONS = ("fp32", "bf16")
LIMITS = {"speedup": 1.8, "labels_pct": 99.5, "probs": 0.01}


def case_images(work: Path, case: str, n: int) -> list[Path]:
    """n distinct images of the case's size (many_images' square images, resized for other shapes)."""
    import cv2

    (h, w) = CASES[case][0]
    square = make_images(work / "images", n, h)
    if h == w:
        return square
    folder = work / f"images_{w}x{h}"
    folder.mkdir(exist_ok=True)
    out = []
    for p in square:
        dest = folder / p.name
        if not dest.is_file():
            cv2.imwrite(str(dest), cv2.resize(cv2.imread(str(p)), (w, h), interpolation=cv2.INTER_CUBIC))
        out.append(dest)
    return out


def segment(case: str, precision: str, images: list[Path], ckpt: dict, cache: Path, work: Path, tag: str,
            npz: bool = True) -> dict:
    """The command line on `images` in a fresh process: wall time, peak memory, per-image time; an npz per image
    (into npz_<tag>/) when `npz`."""
    out, arrays = work / f"out_{tag}", work / f"npz_{tag}"
    for folder in (out, arrays):
        shutil.rmtree(folder, ignore_errors=True)
    refine = CASES[case][1]
    argv = [sys.executable, "-m", "trident_core", "segment", *map(str, images), "--preset", case,
            "--refine" if refine else "--no-refine", "--clip", str(ckpt["clip"]), "--dino", str(ckpt["dino"]),
            "--sam", str(ckpt["sam"]), "--no-download", "--precision", precision, "--device", "cpu",
            "--out", str(out), *(["--save-npz", f"{arrays}/"] if npz else [])]
    env = {"TRIDENT_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"{tag}: {len(images)} image(s) ...", flush=True)
    r = run_process(argv, env, work / f"log_{tag}.txt")
    res = {"wall_s": r["wall_s"], "peak_mb": r["peak_mb"], **parse_cli(r["lines"], len(images))}
    res.pop("last_line_at_s", None)
    print("   ", json.dumps(res), flush=True)
    return res


def agreement(work: Path, case: str) -> dict:
    """bf16 against fp32 over the case's images: labels equal (%), largest probability and logit differences."""
    a_dir, b_dir = work / f"npz_{case}_fp32", work / f"npz_{case}_bf16"
    equal = total = 0
    worst = {"probs": 0.0, "probs_coarse": 0.0, "logits": 0.0}
    coarse_equal = coarse_total = 0
    for fa in sorted(a_dir.glob("*.npz")):
        a, b = np.load(fa), np.load(b_dir / fa.name)
        equal += int((a["labels"] == b["labels"]).sum())
        total += a["labels"].size
        for key in worst:
            if key in a:
                worst[key] = max(worst[key], float(np.abs(a[key].astype(np.float64) - b[key]).max()))
        if "labels_coarse" in a:
            coarse_equal += int((a["labels_coarse"] == b["labels_coarse"]).sum())
            coarse_total += a["labels_coarse"].size
    out = {"labels_equal_pct": round(100 * equal / max(total, 1), 3), **{f"max_diff_{k}": v for k, v in worst.items()}}
    if coarse_total:
        out["coarse_labels_equal_pct"] = round(100 * coarse_equal / coarse_total, 3)
    return out


def fastest(rounds: list[dict]) -> dict:
    """One precision's timed rounds as one run: the fastest per image and whole process, the highest peak."""
    def pick(key: str, best) -> float | None:
        values = [r[key] for r in rounds if r.get(key) is not None]
        return best(values) if values else None

    return {"per_image_s": pick("per_image_s", min), "wall_s": pick("wall_s", min), "peak_mb": pick("peak_mb", max),
            "rounds": len(rounds)}


def targets(m: dict) -> list[dict]:
    """Each target with its value, limit and PASS / FAIL (n/a where a number is missing)."""
    rows = []

    def row(name: str, value: float | None, limit: float, unit: str, higher_is_better: bool, info: str = "") -> None:
        ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
        rows.append({"target": name, "value": value, "limit": limit, "unit": unit,
                     "status": "n/a" if ok is None else "PASS" if ok else "FAIL", "info": info})

    runs = m["runs"]
    peaks = (runs["first_fp32"]["peak_mb"], runs["first_bf16"]["peak_mb"])
    row("first run, 1 image (caches made; bf16 converts): bf16 - fp32", round(peaks[1] - peaks[0], 1), 0.0, "MB",
        False, f"{peaks[0]} / {peaks[1]} MB")
    fp, bf = runs.get("voc21_fp32_timed", {}), runs.get("voc21_bf16_timed", {})
    speed = fp.get("per_image_s") / bf["per_image_s"] if fp.get("per_image_s") and bf.get("per_image_s") else None
    rounds = f" (fastest of {fp['rounds']} rounds)" if fp.get("rounds") else ""
    row("voc21 per image: fp32 / bf16", speed and round(speed, 2), LIMITS["speedup"], "x", True,
        f"{fp.get('per_image_s')} s / {bf.get('per_image_s')} s{rounds}")
    whole = fp["wall_s"] / bf["wall_s"] if fp.get("wall_s") and bf.get("wall_s") else None
    row(f"voc21 whole process, {m.get('images')} images: fp32 / bf16", whole and round(whole, 2), LIMITS["speedup"],
        "x", True, f"{fp.get('wall_s')} s / {bf.get('wall_s')} s (warm text cache){rounds}")
    if fp.get("peak_mb") and bf.get("peak_mb"):
        row("voc21 peak memory (no npz): bf16 - fp32", round(bf["peak_mb"] - fp["peak_mb"], 1), 0.0, "MB", False,
            f"{fp['peak_mb']} / {bf['peak_mb']} MB")
    for case, agree in m["agreement"].items():
        row(f"{case} labels equal to fp32", agree["labels_equal_pct"], LIMITS["labels_pct"], "%", True)
        row(f"{case} probabilities: largest difference", round(agree["max_diff_probs"], 5), LIMITS["probs"], "",
            False)
        peaks = (runs[f"{case}_fp32"]["peak_mb"], runs[f"{case}_bf16"]["peak_mb"])
        row(f"{case} peak memory: bf16 - fp32", round(peaks[1] - peaks[0], 1), 0.0, "MB", False,
            f"{peaks[0]} / {peaks[1]} MB")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", default=os.environ.get("TRIDENT_BENCH_CKPT", "/tmp/trident_bench_ckpt"),
                    help=f"the three checkpoints ({', '.join(FILES.values())}; benchmark.py writes them)")
    ap.add_argument("--images", type=int, default=3, help="images per case (at least 2: per image is after the first)")
    ap.add_argument("--rounds", type=int, default=3, help="timed voc21 runs per precision, alternating")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--work", help="folder for images, outputs and logs (default: a new temporary folder)")
    ap.add_argument("--json", help="write all measurements and targets here")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if args.images < 2 or args.rounds < 1 or any(c not in CASES for c in cases):
        ap.error(f"--images: 2 or more; --rounds: 1 or more; --cases: some of {', '.join(CASES)}")
    ckpt = {k: Path(args.ckpt_dir) / v for k, v in FILES.items()}
    if not all(p.is_file() for p in ckpt.values()):
        ap.error(f"missing checkpoints in {args.ckpt_dir}: python benchmarks/benchmark.py --ckpt-dir {args.ckpt_dir} "
                 "writes them")
    work = Path(args.work or tempfile.mkdtemp(prefix="trident_bf16_"))
    work.mkdir(parents=True, exist_ok=True)
    caches = {p: Path(tempfile.mkdtemp(prefix=f"cache_{p}_", dir=work)) for p in PRECISIONS}
    import torch

    from trident_core.kernels.timing import _cpu_name

    m = {"machine": {"cpu": _cpu_name(), "platform": platform.platform(), "cpus": os.cpu_count(),
                     "torch": torch.__version__, "capabilities": {k: v for k, v in torch.cpu.get_capabilities().items()
                                                                  if "bf16" in k or "amx" in k}
                     if hasattr(torch.cpu, "get_capabilities") else {}},
         "images": args.images, "runs": {}, "agreement": {}}
    print(f"work folder {work}; {m['machine']['cpu']}", flush=True)
    first = case_images(work, "voc21", 1)
    for p in PRECISIONS:  # each precision's caches made once (bf16: the converted weights), its peak its own row
        m["runs"][f"first_{p}"] = segment("voc21", p, first, ckpt, caches[p], work, f"first_{p}", npz=False)
    for case in cases:
        images = case_images(work, case, args.images)
        for p in PRECISIONS:
            m["runs"][f"{case}_{p}"] = segment(case, p, images, ckpt, caches[p], work, f"{case}_{p}")
        if case == "voc21":
            rounds = {p: [] for p in PRECISIONS}
            for r in range(args.rounds):
                for p in PRECISIONS:
                    rounds[p].append(segment(case, p, images, ckpt, caches[p], work, f"{case}_{p}_timed{r + 1}",
                                             npz=False))
            for p in PRECISIONS:
                m["runs"][f"{case}_{p}_timed"] = fastest(rounds[p])
            m["timed_rounds"] = rounds
        m["agreement"][case] = agreement(work, case)
        print("   ", case, json.dumps(m["agreement"][case]), flush=True)
    m["targets"] = targets(m)
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=1))
    print_table(m["targets"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
