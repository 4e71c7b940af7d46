#!/usr/bin/env python
"""Issue #15's whole-process targets: the command line on many images against the reference, on the CPU in float32.

Every measurement is a fresh process, so its peak resident memory is its own (`os.wait4`'s ru_maxrss):

* ours, one image, with an empty text-embedding cache (TRIDENT_CACHE = a new folder: the class names are encoded)
  and again with that cache warm (the embeddings are read back);
* ours on N images for each N in --counts (default 2 and 16), warm cache;
* the reference harness (../shared/reference-harness/run_reference.py) on one image, its `Trident.predict` run
  back to back (benchmarks/reference_predict.py: --ref-warmup calls, then --ref-repeat timed; the median counts).
  Its whole process on one image = that run's wall time less the predict calls after the first (the rest runs
  once), or with --ref-separate-whole a run of its own (the names are then encoded twice: minutes more).

Our command is `python -m trident_core segment IMAGES --preset voc21 --no-refine --classes FILE --clip/--dino/--sam
FILES --no-download --precision fp32 --device cpu --out DIR`. Per-image time is read from outside, from when the
command's progress lines (one per image) arrive: (last - first) / (N - 1), i.e. after the first image (which
also pays for warm-up); it includes reading the image and writing its outputs. The images are distinct, made
deterministically from scikit-image's sample photographs (crops, flips, channel orders, noise). The class file is
voc21's background line (26 synonyms) plus --foreground (default two classes: 28 names to encode); both pipelines
get the same file and the same checkpoints (--ckpt-dir, as written by the harness's make_checkpoints.py).

    python benchmarks/many_images.py [--counts 2 16] [--size 1024] [--json out.json]
    python benchmarks/many_images.py --skip-reference                 # ours only
    python benchmarks/many_images.py --reference-from earlier.json    # reuse the reference's numbers

Each target is printed with its measured value, limit and PASS/FAIL (n/a when a number it needs was not measured;
in parentheses for a row shown for information). MB are MiB (ru_maxrss / 1024); the 2.0 GB limit is 2048 of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "reference-harness"
FILES = {"clip": "clip_ViT-B-16_openai.pt", "dino": "dino_vitbase16_pretrain.pth", "sam": "sam_vit_b_01ec64.pth"}
SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
LIMITS = {"overhead_s": 3.0, "per_image_ratio": 0.25, "rss_spread_mb": 100.0, "rss_mb": 2048.0,
          "one_image_ratio": 0.3}

# -------------------------------------------------------------------------------------------------------- inputs


def make_images(folder: Path, n: int, size: int) -> list[Path]:
    """n distinct size x size RGB PNGs, the same on every machine: crops of the sample photographs, flipped,
    with channels reordered and Gaussian noise (seeded by the index)."""
    import cv2
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    sources = [getattr(data, name)() for name in SOURCES]
    paths = []
    for i in range(n):
        path = folder / f"img_{i:03d}_{size}.png"
        paths.append(path)
        if path.is_file():
            continue
        rng = np.random.default_rng(i)
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        side = int(min(h, w) * rng.uniform(0.6, 1.0))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        img = src[y:y + side, x:x + side]
        if (i // len(sources)) % 2:
            img = img[:, ::-1]
        img = img[..., [(0, 1, 2), (2, 0, 1), (1, 2, 0)][(i // (2 * len(sources))) % 3]]
        img = cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path)
    return paths


def write_class_file(path: Path, foreground: str) -> int:
    """voc21's background line and one line per foreground class; returns the number of names (queries)."""
    sys.path.insert(0, str(ROOT))
    from trident_core import get_preset

    classes = get_preset("voc21").class_list(foreground)
    path.write_text("\n".join("; ".join(names) for names in classes.classes))  # the reference's format
    back = get_preset("voc21").class_list_from_file(str(path))
    assert back == classes, (back, classes)
    return len(classes.queries)


# ----------------------------------------------------------------------------------------------------- processes


def run_process(argv: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run argv to its end in a fresh process; its wall time, peak resident memory (ru_maxrss of that child)
    and every line of its stdout+stderr with the second it arrived."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                         env={**os.environ, **(env or {})}, cwd=ROOT)
    lines = []
    with open(log, "w") if log else open(os.devnull, "w") as f:
        f.write(" ".join(argv) + "\n")
        for line in p.stdout:
            lines.append((round(time.perf_counter() - t0, 3), line.rstrip("\n")))
            f.write(f"[{lines[-1][0]:8.2f}] {line}")
            f.flush()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        raise SystemExit(f"{argv[:4]}... exited with {p.returncode}:\n{tail}")
    return {"wall_s": round(wall, 2), "peak_mb": round(usage.ru_maxrss / 1024, 1), "lines": lines}


def _first(lines: list, pattern: str) -> tuple[float, re.Match] | tuple[None, None]:
    for t, text in lines:
        m = re.search(pattern, text)
        if m:
            return t, m
    return None, None


def parse_cli(lines: list, n: int) -> dict:
    """Timings read from our command's log: model load, text (one image: the time from the load message to the
    first stage line), the image loop, and per image (from the arrival of its progress lines)."""
    out = {}
    t_loaded, m = _first(lines, r"models loaded in ([\d.]+)s")
    if m:
        out["load_s"] = float(m.group(1))
        out["start_s"] = round(t_loaded - out["load_s"], 2)  # interpreter start, imports, arguments
    t_done, m = _first(lines, r"(\d+) segmented in ([\d.]+)s")
    if m:
        out["loop_s"] = float(m.group(2))
        out["segmented"] = int(m.group(1))
        out["last_line_at_s"] = t_done
    if n == 1:
        t_stage, _ = _first(lines, r"^\[\s*[\d.]+s\] ")
        if t_loaded is not None and t_stage is not None:
            out["text_s"] = round(t_stage - t_loaded, 2)
        out["per_image_s"] = out.get("loop_s")
    else:
        done = [t for t, text in lines if re.match(rf"^\[segment\] \[#* *\] \d+/{n} ", text)]
        if len(done) == n:
            out["per_image_s"] = round((done[-1] - done[0]) / (n - 1), 2)
            if t_loaded is not None:
                out["first_image_with_text_s"] = round(done[0] - t_loaded, 2)
    return out


def ours(images: list[Path], classes: Path, ckpt: dict, cache: Path, work: Path, tag: str, threads: int) -> dict:
    """Our command line on `images` in a fresh process, the text-embedding cache in `cache`."""
    text_cache = cache / "text-embeddings"
    warm = text_cache.is_dir() and any(text_cache.iterdir())
    out = work / f"out_{tag}"
    if out.exists():  # an earlier run's complete outputs would be skipped, not segmented again
        shutil.rmtree(out)
    argv = [sys.executable, "-m", "trident_core", "segment", *map(str, images), "--preset", "voc21", "--no-refine",
            "--classes", str(classes), "--clip", str(ckpt["clip"]), "--dino", str(ckpt["dino"]), "--sam",
            str(ckpt["sam"]), "--no-download", "--precision", "fp32", "--device", "cpu", "--out", str(out)]
    env = {"TRIDENT_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"ours {tag}: {len(images)} image(s), text cache {'warm' if warm else 'cold'} ...", flush=True)
    r = run_process(argv, env, work / f"log_{tag}.txt")
    timings = parse_cli(r["lines"], len(images))
    if "last_line_at_s" in timings:  # from the last line to the process's end (interpreter shutdown)
        timings["exit_s"] = round(r["wall_s"] - timings.pop("last_line_at_s"), 2)
    written = sum(1 for p in out.rglob("labels.png")) if out.is_dir() else 0
    res = {"images": len(images), "text_cache": "warm" if warm else "cold", "wall_s": r["wall_s"],
           "peak_mb": r["peak_mb"], "outputs_written": written, **timings}
    print("   ", json.dumps(res), flush=True)
    if written != len(images) or timings.get("segmented") != len(images):
        raise SystemExit(f"ours {tag}: {timings.get('segmented')} of {len(images)} images segmented, {written} "
                         f"outputs written (log: {work}/log_{tag}.txt)")
    return res


def reference(image: Path, classes: Path, args: argparse.Namespace, work: Path) -> dict:
    """The harness on one image in a fresh process, its Trident.predict run --ref-warmup + --ref-repeat times back to
    back. Its whole process on one image is that run's wall time less the calls after the first (no other work
    repeats: the models load and the names are encoded once), or, with --ref-separate-whole, a run of its own."""
    harness_args = ["--image", str(image), "--classes", str(classes), "--preset", "voc21", "--no-sam-refine",
                    "--ckpt-dir", args.ckpt_dir, "--no-stage-peaks"]  # stage peaks would reset ru_maxrss
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
    py = args.ref_python or sys.executable
    res = {}
    if args.ref_separate_whole:
        print("reference: whole process on one image ...", flush=True)
        whole = run_process([py, str(Path(args.harness) / "run_reference.py"), *harness_args, "--out",
                             str(work / "ref_whole.npz")], env, work / "log_ref_whole.txt")
        res |= {"whole_s": whole["wall_s"], "whole_peak_mb": whole["peak_mb"], "whole_how": "own process"}
    warmup = max(args.ref_warmup, 1)
    print(f"reference: predict x{warmup} warm-up + x{args.ref_repeat} timed, back to back ...", flush=True)
    times = work / "ref_times.json"
    run = run_process([py, str(ROOT / "benchmarks" / "reference_predict.py"), "--harness", args.harness,
                       "--warmup", str(warmup), "--repeat", str(args.ref_repeat), "--times-json", str(times),
                       "--", *harness_args, "--out", str(work / "ref.npz")], env, work / "log_ref.txt")
    t = json.loads(times.read_text())
    summary = json.loads((work / "ref.json").read_text())["summary"]
    calls = t["warmup_s"] + t["predict_s"]
    res |= {"init_s": summary["init_s"], "peak_mb": run["peak_mb"], "predict_first_s": calls[0],
            "predict_warmup_s": t["warmup_s"], "predict_back_to_back_s": t["predict_s"],
            "predict_s": round(float(np.median(t["predict_s"])), 2) if t["predict_s"] else None,
            "run_wall_s": run["wall_s"]}
    if "whole_s" not in res:
        res |= {"whole_s": round(run["wall_s"] - sum(calls[1:]), 2),
                "whole_how": "wall time of the back-to-back run less its predict calls after the first"}
    print("   ", json.dumps(res), flush=True)
    return res


# ------------------------------------------------------------------------------------------------------- targets


def targets(m: dict) -> list[dict]:
    """Each of issue #15's targets from the measurements `m` (see main for its keys): name, value, limit, unit
    and status (PASS, FAIL, or n/a when a number is missing)."""
    runs = m.get("ours", {})
    counts = sorted(int(k.split("_")[0]) for k in runs if k.endswith("_warm") and not k.startswith("1_"))
    lo, hi = (runs.get(f"{counts[0]}_warm"), runs.get(f"{counts[-1]}_warm")) if counts else (None, None)
    one_cold, one_warm = runs.get("1_cold"), runs.get("1_warm")
    ref = m.get("reference") or {}
    rows = []

    def row(name, value, limit, unit, info="", information_only=False):
        ok = None if value is None or limit is None else value <= limit
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        rows.append({"target": name, "value": None if value is None else round(value, 2),
                     "limit": None if limit is None else round(limit, 2), "unit": unit,
                     "status": f"({status})" if information_only else status, "info": info})

    per_image = hi.get("per_image_s") if hi else None
    n = hi["images"] if hi else 0
    row(f"{n} images, whole process <= {n} x per image + {LIMITS['overhead_s']:g} s", hi and hi["wall_s"],
        per_image and n * per_image + LIMITS["overhead_s"], "s", f"per image {per_image} s (after the first)")
    row(f"per image <= {LIMITS['per_image_ratio']} x reference predict (back to back)", per_image,
        ref.get("predict_s") and LIMITS["per_image_ratio"] * ref["predict_s"], "s",
        f"reference predict {ref.get('predict_s')} s")
    spread = abs(hi["peak_mb"] - lo["peak_mb"]) if hi and lo and hi is not lo else None
    row(f"peak RSS, {n} vs {lo['images'] if lo else '?'} images, difference", spread,
        LIMITS["rss_spread_mb"], "MB", f"peaks {lo and lo['peak_mb']} / {hi and hi['peak_mb']} MB")
    peaks = [r["peak_mb"] for r in (lo, hi, one_cold, one_warm) if r]
    row("peak RSS, any run of ours", max(peaks) if peaks else None, LIMITS["rss_mb"], "MB",
        "2.0 GiB; " + ", ".join(f"{k}: {r['peak_mb']}" for k, r in runs.items()))
    row(f"one image, whole process (cold text cache) <= {LIMITS['one_image_ratio']} x reference's",
        one_cold and one_cold["wall_s"], ref.get("whole_s") and LIMITS["one_image_ratio"] * ref["whole_s"], "s",
        f"reference whole process {ref.get('whole_s')} s")
    row("  same, warm text cache (information)", one_warm and one_warm["wall_s"],
        ref.get("whole_s") and LIMITS["one_image_ratio"] * ref["whole_s"], "s",
        f"text {one_cold and one_cold.get('text_s')} s cold, {one_warm and one_warm.get('text_s')} s warm "
        f"({m.get('names', '?')} names)", information_only=True)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'target':66s} {'value':>9s} {'limit':>9s}  {'':4s}{'status':6s} info"
    print(head)
    print("-" * len(head))
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.2f}"
        lim = "-" if r["limit"] is None else f"{r['limit']:.2f}"
        print(f"{r['target']:66s} {v:>9s} {lim:>9s}  {r['unit']:4s}{r['status']:6s} {r['info']}")


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", default=os.environ.get("TRIDENT_BENCH_CKPT", "/tmp/trident_ckpt"),
                    help=f"the three checkpoints ({', '.join(FILES.values())})")
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 16], help="numbers of images, one process each")
    ap.add_argument("--size", type=int, default=1024, help="images are SIZE x SIZE")
    ap.add_argument("--foreground", default="person, rocket", help="foreground classes (voc21's background added)")
    ap.add_argument("--work", help="folder for images, outputs and logs (default: a new temporary folder)")
    ap.add_argument("--threads", type=int, default=0, help="OMP/MKL threads of every run (0: their default)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--reference-from", help="take the reference's numbers from an earlier --json")
    ap.add_argument("--harness", default=os.environ.get("TRIDENT_REF_HARNESS", str(HARNESS)))
    ap.add_argument("--ref-python", help="python of the reference harness (default: this one)")
    ap.add_argument("--ref-warmup", type=int, default=1, help="untimed predict calls first (at least 1)")
    ap.add_argument("--ref-repeat", type=int, default=3, help="timed predict calls, back to back")
    ap.add_argument("--ref-separate-whole", action="store_true",
                    help="also run the reference on one image in a process of its own for its whole-process time")
    ap.add_argument("--json", help="write all measurements and targets here")
    args = ap.parse_args(argv)
    if min(args.counts) < 2:
        ap.error("--counts: 2 or more images per run (one image is always measured)")
    ckpt = {k: Path(args.ckpt_dir) / v for k, v in FILES.items()}
    missing = [str(p) for p in ckpt.values() if not p.is_file()]
    if missing:
        ap.error(f"missing checkpoints {missing}: python {HARNESS}/make_checkpoints.py --out {args.ckpt_dir}")
    work = Path(args.work or tempfile.mkdtemp(prefix="trident_many_"))
    work.mkdir(parents=True, exist_ok=True)
    images = make_images(work / "images", max(args.counts), args.size)
    classes = work / "classes.txt"
    names = write_class_file(classes, args.foreground)
    cache = Path(tempfile.mkdtemp(prefix="cache_", dir=work))  # new, empty: the first run encodes the text
    print(f"work folder {work}; {len(images)} images of {args.size}x{args.size}; {names} class names", flush=True)
    m = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
         "size": args.size, "names": names, "foreground": args.foreground, "ours": {}}
    m["ours"]["1_cold"] = ours(images[:1], classes, ckpt, cache, work, "1_cold", args.threads)
    m["ours"]["1_warm"] = ours(images[:1], classes, ckpt, cache, work, "1_warm", args.threads)
    for n in sorted(set(args.counts)):
        m["ours"][f"{n}_warm"] = ours(images[:n], classes, ckpt, cache, work, f"{n}_warm", args.threads)
    if args.reference_from:
        m["reference"] = json.loads(Path(args.reference_from).read_text())["reference"]
        m["reference"]["from"] = args.reference_from
    elif not args.skip_reference:
        m["reference"] = reference(images[0], classes, args, work)
    m["targets"] = targets(m)
    print()
    print_table(m["targets"])
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
