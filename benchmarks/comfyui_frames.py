"""Resident memory of the real ComfyUI running Trident Segment + Segmentation to Masks on a batch of N frames.

For each N, a fresh server (the comfyui-harness of ../shared) runs Load Image -> RepeatImageBatch(N) -> Trident
Segment -> Segmentation to Masks -> Preview Any; the server's peak resident memory (VmHWM) and its resident memory
after the run (VmRSS) are read from /proc. Usage:

    python benchmarks/comfyui_frames.py --models DIR [--frames 2 32] [--size 512] [--port 8191] [--refine]

DIR holds open_clip/, dino/ and sams/ with the checkpoints named by --clip/--dino/--sam."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "comfyui-harness"


def memory_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak) and VmRSS of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def prompt(n: int, image: str, args: argparse.Namespace) -> dict:
    """The API prompt of the measured graph."""
    load = {"precision": "fp32", "allow_download": False}
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": n}},
        "3": {"class_type": "TridentLoadCLIP", "inputs": {"model_name": args.clip, **load}},
        "4": {"class_type": "TridentLoadDINO", "inputs": {"model_name": args.dino, **load}},
        "5": {"class_type": "TridentLoadSAM", "inputs": {"model_name": args.sam, **load}},
        "6": {"class_type": "TridentSegment", "inputs": {
            "image": ["2", 0], "clip": ["3", 0], "dino": ["4", 0], "sam": ["5", 0], "classes": args.classes,
            "preset": "default", "refine": args.refine, "sam_tiles": "preset"}},
        "7": {"class_type": "TridentSegmentationToMasks", "inputs": {"segmentation": ["6", 0], "classes": "person",
                                                                      "invert": False}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--frames", type=int, nargs="+", default=[2, 32])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--port", type=int, default=8191)
    ap.add_argument("--refine", action="store_true")
    ap.add_argument("--classes", default="sky, person, grass")
    ap.add_argument("--clip", default="clip_ViT-B-16_openai.pt")
    ap.add_argument("--dino", default="dino_vitbase16_pretrain.pth")
    ap.add_argument("--sam", default="sam_vit_b_01ec64.pth")
    ap.add_argument("--pack", default=str(ROOT))
    args = ap.parse_args()
    sys.path.insert(0, str(HARNESS))
    import comfy_server
    import run_workflow
    from PIL import Image
    from skimage import data

    inputs = Path(tempfile.mkdtemp(prefix="trident_frames_"))
    Image.fromarray(data.astronaut()).resize((args.size, args.size)).save(inputs / "frame.png")
    results = []
    for n in args.frames:
        srv = comfy_server.start([args.pack], models=args.models, port=args.port, input_dir=str(inputs))
        try:
            before = memory_mb(srv["pid"])
            code = run_workflow.run_api_prompt(srv["url"], prompt(n, "frame.png", args), 3600,
                                               str(inputs / f"out{n}"))
            after = memory_mb(srv["pid"])
        finally:
            comfy_server.stop(srv["pid"])
        if code != 0:
            raise SystemExit(f"the prompt with {n} frames failed (exit {code})")
        results.append({"frames": n, "rss_before_mb": round(before["VmRSS"]), "peak_mb": round(after["VmHWM"]),
                        "rss_after_mb": round(after["VmRSS"])})
        print(json.dumps(results[-1]), flush=True)
    first = results[0]
    for r in results[1:]:
        print(f"{r['frames']} vs {first['frames']} frames: peak +{r['peak_mb'] - first['peak_mb']} MB, "
              f"resident after the run +{r['rss_after_mb'] - first['rss_after_mb']} MB")


if __name__ == "__main__":
    main()
