#!/usr/bin/env python
"""Per-stage wall time and peak memory of the whole pipeline on random-weight full-size models.

Builds CLIP ViT-B/16 (OpenAI layout, QuickGELU), DINO ViT-B/16 and SAM ViT-B with random weights in their official
file formats (once, into --ckpt-dir), loads them through trident_core's real loaders, and runs fixed cases:
voc21 at 448 on a 1024x1024 image and city_scapes on a 2048x1024 image, each with and without refinement.
Peak memory is resident memory on CPU (the kernel's high-water mark, reset before each stage) and
`torch.cuda.max_memory_allocated` on a GPU, where the models run in float16.

    python benchmarks/benchmark.py [--device cpu|cuda] [--cases voc21,voc21_refine,...] [--json out.json]
    python benchmarks/benchmark.py --repeat 20      # memory and hooks over repeated calls
    python benchmarks/benchmark.py --throughput 10  # GPU: images/s at 448, fp16 vs fp32 label agreement
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trident_core import (  # noqa: E402
    Trident,
    get_preset,
    kernels,  # noqa: E402
    parse_classes,
)
from trident_core.aggregation import splice_and_aggregate  # noqa: E402
from trident_core.classify import classify  # noqa: E402
from trident_core.pipeline import compute_window_features, encode_image  # noqa: E402
from trident_core.refine import refine  # noqa: E402

CLASSES = "person, flag, rocket, sky"
CASES = {
    "voc21": ("voc21", (1024, 1024), False),
    "voc21_refine": ("voc21", (1024, 1024), True),
    "city_scapes": ("city_scapes", (1024, 2048), False),
    "city_scapes_refine": ("city_scapes", (1024, 2048), True),
}
FILES = {"clip": "clip_ViT-B-16_openai.pt", "dino": "dino_vitbase16_pretrain.pth", "sam": "sam_vit_b_01ec64.pth"}


def build_checkpoints(folder: Path) -> dict[str, Path]:
    """Random-weight full-size checkpoints in the official layouts (written once)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / v for k, v in FILES.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    import open_clip
    import timm
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-16-quickgelu").state_dict(), paths["clip"])
    dino = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).state_dict()
    torch.save({k: v for k, v in dino.items() if not k.startswith(("fc_norm", "head", "norm_pre"))}, paths["dino"])
    torch.save(build_sam_vit_b(checkpoint=None).state_dict(), paths["sam"])
    return paths


def test_image(size: tuple[int, int]) -> np.ndarray:
    """A real photograph (scikit-image's astronaut, public domain) tiled/resized to `size` (H, W)."""
    import cv2
    from skimage import data

    img = data.astronaut()
    if size[1] >= 2 * size[0]:
        img = np.concatenate([img, img[:, ::-1]], axis=1)
    return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


class Meter:
    """Wall time and peak memory per named stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: dict[str, dict[str, float]] = {}
        self.peak = 0.0

    @staticmethod
    def _rss_hwm() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def _read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return self._rss_hwm()

    @contextlib.contextmanager
    def stage(self, name: str):
        self._reset()
        t0 = time.perf_counter()
        yield
        mem = self._read()
        dt = time.perf_counter() - t0
        self.rows[name] = {"seconds": round(dt, 3), "peak_mb": round(mem, 1)}
        self.peak = max(self.peak, mem)


def run_case(tr: Trident, name: str, device: torch.device) -> dict:
    preset, size, refine_on = CASES[name]
    params = get_preset(preset).params.update(refine=refine_on)
    img = test_image(size)
    classes = parse_classes(CLASSES)
    tr.clip.text_cache.clear()
    m = Meter(device)
    with torch.no_grad():
        with m.stage("text"):
            text = tr.text(classes)
        with m.stage("text_again"):
            tr.text(classes)
        with m.stage("windows (S0-S4)"):
            wf = compute_window_features(tr.clip, tr.dino, img, params.windows)
        with m.stage("sam_encoder (S6)"):
            encs = encode_image(tr.sam, img, params.aggregation)
        with m.stage("aggregate (S5-S7)"):
            fm = splice_and_aggregate(wf, tr.clip, tr.sam, encs, params.aggregation)
        with m.stage("classify (S8)"):
            seg = classify(fm, text, classes, params.classification)
        if refine_on:
            with m.stage("refine (S9)"):
                seg = refine(seg, tr.sam, img, params.refinement, encs.whole)
    image_s = sum(r["seconds"] for k, r in m.rows.items() if not k.startswith("text"))
    return {"case": name, "preset": preset, "image_hw": list(size), "refine": refine_on, "stages": m.rows,
            "image_seconds": round(image_s, 2), "peak_mb": round(m.peak, 1), "refine_info": seg.info}


def repeat_check(tr: Trident, n: int) -> dict:
    """Resident memory and hook counts over n repeated calls of the same request."""
    img = test_image((512, 512))
    rss = []
    for _ in range(n):
        tr.segment(img, CLASSES, get_preset("voc21").params.update(refine=True))
        with open("/proc/self/status") as f:
            rss.append(next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmRSS:")))
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for mod in (tr.clip.model, tr.dino.model,
                                                                            tr.sam.model) for m in mod.modules())
    return {"calls": n, "rss_mb_first": round(rss[0], 1), "rss_mb_last": round(rss[-1], 1),
            "rss_mb_max": round(max(rss), 1), "hooks_left": hooks}


def throughput(paths: dict[str, Path], device: torch.device, n: int, low: str = "fp16",
               size: tuple[int, int] = (448, 448), short_side: int | None = None) -> dict:
    """Images per second (voc21, one image per call) in the `low` precision with and without refinement, its peak
    memory (GPU: max_memory_allocated), and its label agreement with float32."""
    img = test_image(size)
    out = {}
    labels = {}
    for precision in dict.fromkeys((low, "fp32")):
        tr = Trident.from_files(paths["clip"], paths["dino"], paths["sam"], device, precision)
        for refine_on in (False, True):
            tag = "refine" if refine_on else "no_refine"
            params = get_preset("voc21").params.update(refine=refine_on, short_side=short_side)
            labels[(precision, refine_on)] = tr.segment(img, CLASSES, params).labels.cpu()  # also the warm-up
            if precision == low:
                meter = Meter(device)
                with meter.stage(tag):
                    for _ in range(n):
                        tr.segment(img, CLASSES, params)
                out[f"img_per_s_{tag}"] = round(n / meter.rows[tag]["seconds"], 2)
                out[f"peak_mb_{tag}"] = meter.rows[tag]["peak_mb"]
        del tr
        torch.cuda.empty_cache()
    for refine_on in (False, True):
        agree = (labels[(low, refine_on)] == labels[("fp32", refine_on)]).float().mean().item()
        out[f"{low}_fp32_label_agreement_{'refine' if refine_on else 'no_refine'}"] = round(100 * agree, 3)
    return out


def print_kernels(rows: list[dict]) -> None:
    """Which tricks of trident_core.kernels ran for which shapes here, their probe timings and what each saved."""
    if not kernels.enabled():
        print(f"kernels: off ({kernels.ENV}=0)")
        return
    print(f"{'kernel decision':52s}{'ours ms':>9s}{'torch ms':>9s}  {'runs':>5s}  {'saved s':>8s}")
    for r in rows:
        print(f"{r['key']:52s}{r['ours_ms']:9.2f}{r['torch_ms']:9.2f}  {'ours' if r['use_ours'] else 'torch':>5s}"
              f"  {r['saved_s']:8.2f}")
    print(f"{'total saved':52s}{'':25s}{sum(r['saved_s'] for r in rows):8.2f}")


def print_table(results: list[dict]) -> None:
    stages = list(dict.fromkeys(s for r in results for s in r["stages"]))
    head = f"{'stage':22s}" + "".join(f"{r['case']:>24s}" for r in results)
    print(head)
    print("-" * len(head))
    for s in stages:
        cells = []
        for r in results:
            row = r["stages"].get(s)
            cells.append(f"{row['seconds']:9.2f} s {row['peak_mb']:8.0f} MB" if row else " " * 24)
        print(f"{s:22s}" + "".join(f"{c:>24s}" for c in cells))
    print(f"{'image total (no text)':22s}" + "".join(f"{r['image_seconds']:>11.2f} s{'':11s}" for r in results))
    print(f"{'peak':22s}" + "".join(f"{r['peak_mb']:>22.0f} MB" for r in results))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", default=os.environ.get("TRIDENT_BENCH_CKPT", "/tmp/trident_bench_ckpt"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeat", type=int, default=0, help="also check memory/hooks over N repeated calls")
    ap.add_argument("--throughput", type=int, default=0, help="GPU: time N images at 448 per setting")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    paths = build_checkpoints(Path(args.ckpt_dir))
    meter = Meter(device)
    with meter.stage("load"):
        tr = Trident.from_files(paths["clip"], paths["dino"], paths["sam"], device, args.precision)
    results = [run_case(tr, c, device) for c in args.cases.split(",") if c]
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                          "dtype": str(tr.sam.dtype)},
              "load": meter.rows["load"], "cases": results}
    print_table(results)
    report["kernels"] = kernels.report()
    print_kernels(report["kernels"])
    if args.repeat:
        report["repeat"] = repeat_check(tr, args.repeat)
        print("repeat:", report["repeat"])
    if args.throughput and device.type == "cuda":
        del tr
        report["throughput"] = throughput(paths, device, args.throughput)
        print("throughput:", report["throughput"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
