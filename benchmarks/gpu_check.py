#!/usr/bin/env python
"""Everything issue #25 checks on a CUDA machine, in one run that writes one summary (gpu_check.json and .md).

Sections, each timed and recorded even when another fails: the golden tests on the device in float32; float16
labels against float32 on the benchmark cases; benchmark.py's throughput (batch 1, float16, with and without
refinement, peak memory); GPU memory back to its baseline after a run and over 20 repeated calls; a frame batch
through Trident Segment's node code (ComfyUI absent) against one frame at a time, with its peak memory against
one shared forward's frames; the command line on a folder of frames (sharing forwards) against one image per
forward; images/s for batches of 1, 8 and 32 at 448x448 and 1024x1024. The checkpoints are random
full-size ones built here (no network). `--device cpu --dry-run` runs every section on small models and sizes,
frames sharing forwards two at a time as on a GPU.

    python benchmarks/gpu_check.py --out DIR [--device cuda] [--dry-run]   (benchmarks/gpu_check.sh wraps it)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import benchmark  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from pack_import import core, import_pack  # noqa: E402  (the pack as ComfyUI imports it: its nodes run as there)

# correctness limits: a frame batch may add this much to the peak of one shared forward's frames, its labels
# agree with one frame at a time on this share of pixels (float16's rounding under another batch shape), repeated
# calls leave this much
PEAK_GROWTH_LIMIT_MB = 64.0
FRAME_AGREEMENT_PCT = 99.9
LEFTOVER_LIMIT_MB = 1.0
TARGET_IMG_PER_S, TARGET_PEAK_MB = 40.0, 4096.0  # issue #25: 448x448, float16, no refinement, batch 32


@dataclass(frozen=True)
class Plan:
    """What one run does: full sizes on a GPU, or small models, small images and few frames (--dry-run)."""

    device: torch.device
    low: str  # the lower precision compared with float32 (fp16 on a GPU; fp32 on the CPU, which has no fp16)
    dry: bool
    sizes: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    frames: int
    repeats: int
    throughput_n: int
    short_side: int | None  # None: the presets' own

    @classmethod
    def make(cls, device: str, dry: bool) -> Plan:
        dev = torch.device(device)
        low = "fp16" if dev.type == "cuda" else "fp32"
        if dry:
            return cls(dev, low, True, ((64, 96),), (1, 2, 3), 3, 2, 1, 224)
        return cls(dev, low, False, ((448, 448), (1024, 1024)), (1, 8, 32), 32, 20, 20, None)


# --------------------------------------------------------------------------------------------------- helpers

def allocated_mb(device: torch.device) -> float | None:
    """Memory the caching allocator holds for live tensors on a GPU (None on the CPU, which has no such count)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.memory_allocated(device) / 2**20, 2)


def free_memory(device: torch.device) -> None:
    """Drop what Python still refers to and the allocator's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def frames(size: tuple[int, int], n: int) -> torch.Tensor:
    """n distinct frames (a pan over the benchmark's photograph) as a ComfyUI IMAGE batch [n, H, W, 3]."""
    base = benchmark.test_image(size)
    step = max(1, size[1] // (2 * n))
    return torch.from_numpy(np.stack([np.roll(base, k * step, axis=1) for k in range(n)])).float() / 255.0


class SegmentNode:
    """Trident Segment's `execute` on models loaded on the device, as the loader nodes hand them over; both in
    inference mode, as ComfyUI's executor runs nodes (its tensors keep no version counter)."""

    @torch.inference_mode()
    def __init__(self, paths: dict[str, Path], plan: Plan):
        pack = import_pack().__name__
        handle = sys.modules[f"{pack}.nodes.sockets"].ModelHandle
        tr = core("pipeline").Trident.from_files(paths["clip"], paths["dino"], paths["sam"], plan.device, plan.low)
        self.trident = tr
        self.models = {"clip": handle(tr.clip), "dino": handle(tr.dino), "sam": handle(tr.sam)}
        self.node = sys.modules[f"{pack}.nodes.stages"].TridentSegment
        self.preset = ({"preset": "custom", "short_side": plan.short_side} if plan.short_side else "default")

    def frames_per_forward(self, size: tuple[int, int]) -> int:
        """The frames per forward the node chooses for frames of `size` (the default preset's SAM tiles), now."""
        return self.trident.frames_per_forward(core("config").Params(), size)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, refine: bool) -> list:
        return self.node.execute(image=images, classes=benchmark.CLASSES, preset=self.preset, refine=refine,
                                 sam_tiles="preset", **self.models).args[0]


def force_frames_per_forward(n: int) -> None:
    """The dry run: frames share forwards on the CPU as they would on a GPU (n at a time), so the script's
    frame sections run the shared path before the one GPU run does."""
    core("pipeline").Trident.frames_per_forward = lambda _self, _params, _size, _free=None: n


def timed(device: torch.device, fn: Callable[[], object]) -> tuple[object, float, float]:
    """fn's result, its seconds and its peak memory (benchmark.Meter: GPU allocations, or resident memory)."""
    meter = benchmark.Meter(device)
    with meter.stage("run"):
        result = fn()
    return result, meter.rows["run"]["seconds"], meter.rows["run"]["peak_mb"]


# ------------------------------------------------------------------------------------------------- verdicts

def golden_verdict(returncode: int, summary: str, dry: bool) -> str:
    """PASS when pytest passed and ran the tests (they skip, and pytest exits 0, where the golden fixtures are
    absent); a dry run only collects them."""
    ran = "collected" in summary if dry else "passed" in summary and "skipped" not in summary
    return "PASS" if returncode == 0 and ran else "FAIL"


def memory_verdict(m: dict) -> str:
    """PASS when neither the repeated calls nor the released models leave memory behind (n/a without counts)."""
    if m.get("loaded_mb") is None:
        return "n/a (no allocator counts on this device)"
    ok = (m["after_repeats_max_mb"] - m["after_first_mb"] <= LEFTOVER_LIMIT_MB
          and m["after_release_mb"] - m["before_load_mb"] <= LEFTOVER_LIMIT_MB)
    return "PASS" if ok else "FAIL"


def frames_verdict(m: dict) -> str:
    """PASS when the batch's labels agree with one frame at a time's (within float16's rounding: frames share
    forwards) and its peak stays near that of one shared forward's frames (it does not grow with the batch)."""
    same = m["label_agreement_pct"] >= FRAME_AGREEMENT_PCT
    flat = m["peak_growth_mb"] <= PEAK_GROWTH_LIMIT_MB or m["device"] != "cuda"  # resident memory is not comparable
    return "PASS" if same and flat else "FAIL"


def target_verdict(rates: list[dict]) -> str:
    """Issue #25's target: >= 40 images/s at 448x448 without refinement at batch 32, peak under 4 GB."""
    row = next((r for r in rates if r["size"] == [448, 448] and r["batch"] == 32), None)
    if row is None:
        return "n/a (no 448x448 batch of 32 measured)"
    met = row["img_per_s"] >= TARGET_IMG_PER_S and row["peak_mb"] < TARGET_PEAK_MB
    return f"{'met' if met else 'not met'} ({row['img_per_s']} images/s, peak {row['peak_mb']} MB)"


# ------------------------------------------------------------------------------------------------- sections

def golden(plan: Plan, _paths: dict[str, Path]) -> dict:
    """tests/test_golden.py on the device in float32 (conftest's TRIDENT_TEST_DEVICE); collected only when dry."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_golden.py"]
    if plan.dry:
        cmd.append("--collect-only")
    env = {**os.environ, "TRIDENT_TEST_DEVICE": str(plan.device)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    summary = lines[-1] if lines else ""
    status = golden_verdict(proc.returncode, summary, plan.dry)
    return {"command": " ".join(cmd[2:]), "device": str(plan.device), "returncode": proc.returncode,
            "summary": summary, "status": status, **({"tail": lines[-30:]} if status == "FAIL" else {})}


def agreement(plan: Plan, paths: dict[str, Path]) -> dict:
    """Labels in the lower precision against float32 on benchmark.py's cases (percent of pixels)."""
    models = {p: benchmark.Trident.from_files(paths["clip"], paths["dino"], paths["sam"], plan.device, p)
              for p in dict.fromkeys((plan.low, "fp32"))}
    out = {}
    for name, (preset, size, refine_on) in benchmark.CASES.items():
        params = benchmark.get_preset(preset).params.update(refine=refine_on, short_side=plan.short_side)
        img = benchmark.test_image(plan.sizes[0] if plan.dry else size)
        labels = {p: tr.segment(img, benchmark.CLASSES, params).labels.cpu() for p, tr in models.items()}
        out[name] = round(100 * (labels[plan.low] == labels["fp32"]).float().mean().item(), 3)
    del models
    free_memory(plan.device)
    return {"compared": f"{plan.low} vs fp32", "label_agreement_pct": out}


def throughput(plan: Plan, paths: dict[str, Path]) -> dict:
    """benchmark.py --throughput: batch 1 at 448 (voc21), with and without refinement."""
    size = plan.sizes[0] if plan.dry else (448, 448)
    return {"precision": plan.low, "calls": plan.throughput_n, "size": list(size),
            **benchmark.throughput(paths, plan.device, plan.throughput_n, plan.low, size, plan.short_side)}


def memory(plan: Plan, paths: dict[str, Path]) -> dict:
    """GPU memory before loading, after one call, over repeated calls, and after the models are released."""
    free_memory(plan.device)
    m = {"before_load_mb": allocated_mb(plan.device)}
    tr = benchmark.Trident.from_files(paths["clip"], paths["dino"], paths["sam"], plan.device, plan.low)
    m["loaded_mb"] = allocated_mb(plan.device)
    img = benchmark.test_image(plan.sizes[0])
    params = benchmark.get_preset("voc21").params.update(refine=True, short_side=plan.short_side)
    tr.segment(img, benchmark.CLASSES, params)  # the text embeddings stay cached on the CLIP model
    m["after_first_mb"] = allocated_mb(plan.device)
    after = []
    for _ in range(plan.repeats):
        tr.segment(img, benchmark.CLASSES, params)
        after.append(allocated_mb(plan.device))
    m["repeats"] = plan.repeats
    m["after_repeats_max_mb"] = max(after) if after[0] is not None else None
    m["after_repeats_last_mb"] = after[-1]
    del tr
    free_memory(plan.device)
    m["after_release_mb"] = allocated_mb(plan.device)
    m["status"] = memory_verdict(m)
    return m


def frame_batch(plan: Plan, paths: dict[str, Path]) -> dict:
    """A batch of frames through Trident Segment's node code against each frame alone (labels), and its peak memory
    against that of one shared forward's frames (`frames_per_forward`: 1 on the CPU)."""
    node = SegmentNode(paths, plan)
    size = plan.sizes[0]
    batch = frames(size, plan.frames)
    node(batch[:1], True)  # warm-up
    per_forward = min(plan.frames, node.frames_per_forward(size))
    singles, _, peak_one = timed(plan.device, lambda: [node(batch[k:k + 1], True)[0] for k in range(plan.frames)])
    _, _, peak_forward = timed(plan.device, lambda: node(batch[:per_forward], True))
    together, _, peak_all = timed(plan.device, lambda: node(batch, True))
    same = sum(int((a.labels == b.labels).sum()) for a, b in zip(together, singles))
    m = {"frames": plan.frames, "size": list(size), "refine": True, "precision": plan.low,
         "device": plan.device.type, "frames_per_forward": per_forward,
         "label_agreement_pct": round(100 * same / batch[..., 0].numel(), 4), "peak_mb_one_frame": peak_one,
         "peak_mb_one_forward": peak_forward, "peak_mb_batch": peak_all,
         "peak_growth_mb": round(peak_all - peak_forward, 1)}
    m["status"] = frames_verdict(m)
    return m


def rates(plan: Plan, paths: dict[str, Path]) -> dict:
    """Images/s and peak memory of Trident Segment (no refinement) per batch size and image size."""
    node = SegmentNode(paths, plan)
    rows = []
    for size in plan.sizes:
        batch = frames(size, max(plan.batches))
        node(batch[:1], False)  # warm-up at this size
        for b in plan.batches:
            calls = plan.batches[1] if b == 1 else 1  # batch 1: as many single calls as the next batch has frames
            images = batch[:b]
            _, seconds, peak = timed(plan.device, lambda images=images, calls=calls: [node(images, False)
                                                                                     for _ in range(calls)])
            rows.append({"size": list(size), "batch": b, "images": b * calls, "seconds": seconds,
                         "img_per_s": round(b * calls / seconds, 2), "peak_mb": peak})
    return {"precision": plan.low, "refine": False,
            "frames_per_forward": {"x".join(map(str, size)): node.frames_per_forward(size) for size in plan.sizes},
            "rows": rows, "target": target_verdict(rows)}


def folder(plan: Plan, paths: dict[str, Path]) -> dict:
    """The command line on a folder of frames (images of one size share forwards as the device chooses) against
    the same folder one image per forward: labels, seconds (the models' loading included) and peak memory."""
    from PIL import Image

    cli, trident = core("cli"), core("pipeline").Trident
    work = Path(tempfile.mkdtemp(prefix="gpu_check_folder_"))
    (work / "in").mkdir()
    size = plan.sizes[0]
    for k, frame in enumerate((frames(size, plan.frames) * 255).round().to(torch.uint8).numpy()):
        Image.fromarray(frame).save(work / "in" / f"{k:03d}.png")

    def segment(out: str) -> int:
        return cli.main(["segment", str(work / "in"), "--classes", benchmark.CLASSES, "--no-refine", "--clip",
                         str(paths["clip"]), "--dino", str(paths["dino"]), "--sam", str(paths["sam"]),
                         "--no-download", "--device", plan.device.type, "--precision", plan.low,
                         "--save-npz", f"{work / out}/",
                         *(["--short-side", str(plan.short_side)] if plan.short_side else [])])

    shared = trident.frames_per_forward
    trident.frames_per_forward = lambda _self, _params, _size, _free=None: 1
    try:
        rc_one, seconds_one, peak_one = timed(plan.device, lambda: segment("one"))
    finally:
        trident.frames_per_forward = shared
    rc, seconds, peak = timed(plan.device, lambda: segment("shared"))
    same = total = 0
    for one in sorted((work / "one").glob("*.npz")):
        with np.load(one) as a, np.load(work / "shared" / one.name) as b:
            same += int((a["labels"] == b["labels"]).sum())
            total += a["labels"].size
    m = {"images": plan.frames, "size": list(size), "refine": False, "precision": plan.low, "exit_codes": [rc_one, rc],
         "label_agreement_pct": round(100 * same / max(total, 1), 4) if total else None,
         "seconds_one_per_forward": seconds_one, "seconds_shared": seconds,
         "peak_mb_one_per_forward": peak_one, "peak_mb_shared": peak}
    agree = rc == rc_one == 0 and total == plan.frames * size[0] * size[1] and \
        m["label_agreement_pct"] >= FRAME_AGREEMENT_PCT
    m["status"] = "PASS" if agree else "FAIL"
    return m


SECTIONS: dict[str, Callable[[Plan, dict[str, Path]], dict]] = {
    "golden": golden, "agreement": agreement, "throughput": throughput, "memory": memory,
    "frame_batch": frame_batch, "folder": folder, "rates": rates}


# -------------------------------------------------------------------------------------------------- summary

def machine(plan: Plan) -> dict:
    gpu = plan.device.type == "cuda"
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": str(plan.device),
            "gpu": torch.cuda.get_device_name(plan.device) if gpu else None,
            "gpu_total_mb": round(torch.cuda.get_device_properties(plan.device).total_memory / 2**20) if gpu else None,
            "dry_run": plan.dry}


def markdown(report: dict) -> str:
    """The summary as markdown: the machine, then each section's figures as a table."""
    lines = ["# GPU check", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["machine"].items()]
    for name, sec in report["sections"].items():
        lines += ["", f"## {name}", "", "| | |", "|---|---|"]
        for k, v in sec.items():
            if k == "rows":
                continue
            shown = json.dumps(v) if isinstance(v, (dict, list)) else v
            lines.append(f"| {k} | {str(shown).replace('|', '/')} |")
        if sec.get("rows"):
            lines += ["", "| size | batch | images | seconds | images/s | peak MB |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['size'][0]}x{r['size'][1]} | {r['batch']} | {r['images']} | {r['seconds']} | "
                      f"{r['img_per_s']} | {r['peak_mb']} |" for r in sec["rows"]]
    return "\n".join(lines) + "\n"


def failed(report: dict) -> list[str]:
    """The sections that raised or whose correctness check failed."""
    return [n for n, s in report["sections"].items() if "error" in s or s.get("status") == "FAIL"]


def run_sections(plan: Plan, paths: dict[str, Path], names: list[str], out: Path, budget_s: float) -> dict:
    """Each section in turn, its result or error recorded; the summary rewritten after each (a run cut short
    still leaves what it measured)."""
    report = {"machine": machine(plan), "sections": {}}
    start = time.perf_counter()
    for name in names:
        if time.perf_counter() - start > budget_s:
            report["sections"][name] = {"error": f"skipped: the {budget_s:g} s budget was spent"}
            continue
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            result = SECTIONS[name](plan, paths)
        except Exception as e:  # one section's failure must not cost the others' figures
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc().splitlines()[-12:]}
        free_memory(plan.device)  # what the section held is gone once it returned
        result["section_seconds"] = round(time.perf_counter() - t0, 1)
        result["allocated_mb_after"] = allocated_mb(plan.device)
        report["sections"][name] = result
        print(f"[gpu_check] {name}: {json.dumps(result)}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.md").write_text(markdown(report))
    return report


def checkpoints(plan: Plan, folder: Path) -> dict[str, Path]:
    """Random-weight checkpoints: full size in the official layouts, or the tests' small ones when dry."""
    if not plan.dry:
        return benchmark.build_checkpoints(folder)
    from factory import write_small_checkpoints

    return write_small_checkpoints(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="small models, sizes and counts (to test the script)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--ckpt-dir", help="where the random checkpoints are built (default: a temporary folder)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="sections not started by then are skipped")
    args = ap.parse_args(argv)
    names = [n for n in args.sections.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(unknown)}; choose among {', '.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to PyTorch here; run on a GPU machine, or use "
                         "--device cpu --dry-run to test the script")
    plan = Plan.make(args.device, args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if plan.device.type == "cuda":  # float32 means float32 (the golden tests' tolerances assume it)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if plan.dry:
        force_frames_per_forward(2)
    paths = checkpoints(plan, Path(args.ckpt_dir or tempfile.mkdtemp(prefix="trident_gpu_check_")))
    report = run_sections(plan, paths, names, out, args.budget_s)
    bad = failed(report)
    print(f"[gpu_check] summary in {out / 'gpu_check.md'}; " + (f"FAILED: {', '.join(bad)}" if bad else "all passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
