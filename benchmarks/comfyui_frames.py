"""Resident memory of the real ComfyUI running Trident Segment + Segmentation to Masks on a batch of N frames.

For each N, a fresh server (the comfyui-harness of ../shared) runs Load Image -> RepeatImageBatch(N) -> Trident
Segment -> Segmentation to Masks -> Preview Any; the server's peak resident memory (VmHWM) and its resident memory
after the run (VmRSS) are read from /proc. Usage:

    python benchmarks/comfyui_frames.py --models DIR [--frames 2 32] [--size 512] [--port 8191] [--refine]
    python benchmarks/comfyui_frames.py --clip /tmp/trident_ckpt/clip_ViT-B-16_openai.pt \
        --dino /tmp/trident_ckpt/dino_vitbase16_pretrain.pth --sam /tmp/trident_ckpt/sam_vit_b_01ec64.pth

DIR holds open_clip/, dino/ and sams/ with the checkpoints named by --clip/--dino/--sam; a checkpoint given as a
path to a file is linked into a temporary models folder instead (then --models is needed only for names).
Issue #15's target: the server's rise in resident memory over the run (its peak less its resident memory before
the prompt) with the most frames is at most --limit-mb (150) above that with the fewest (--json: all numbers)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "comfyui-harness"
SUBFOLDERS = {"clip": "open_clip", "dino": "dino", "sam": "sams"}  # nodes/comfy_bridge.py's FOLDERS


def memory_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak) and VmRSS of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def models_folder(args: argparse.Namespace) -> str:
    """--models, or a temporary models folder linking the checkpoints given as paths (their names then go into the
    prompt)."""
    given = {role: Path(getattr(args, role)) for role in SUBFOLDERS}
    if not any(p.is_file() for p in given.values()):
        if not args.models:
            raise SystemExit("give --models DIR, or --clip/--dino/--sam as paths to the checkpoint files")
        return args.models
    folder = Path(tempfile.mkdtemp(prefix="trident_models_"))
    for role, sub in SUBFOLDERS.items():
        src = given[role] if given[role].is_file() else Path(args.models or "") / sub / given[role]
        if not src.is_file():
            raise SystemExit(f"--{role} {given[role]}: no such file (nor under --models)")
        (folder / sub).mkdir()
        (folder / sub / src.name).symlink_to(src.resolve())
        setattr(args, role, src.name)
    return str(folder)


def compare(results: list[dict], limit_mb: float) -> dict:
    """The target: rise of the peak over the resident memory before the prompt, most frames vs fewest."""
    lo, hi = min(results, key=lambda r: r["frames"]), max(results, key=lambda r: r["frames"])
    extra = hi["peak_rise_mb"] - lo["peak_rise_mb"]
    return {"frames": [lo["frames"], hi["frames"]], "extra_peak_rise_mb": extra,
            "extra_rise_after_mb": hi["rise_after_mb"] - lo["rise_after_mb"], "limit_mb": limit_mb,
            "status": "PASS" if extra <= limit_mb else "FAIL"}


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
    ap.add_argument("--models", help="models folder (open_clip/, dino/, sams/); not needed when the three "
                    "checkpoints are given as paths")
    ap.add_argument("--frames", type=int, nargs="+", default=[2, 32])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--port", type=int, default=8191)
    ap.add_argument("--refine", action="store_true")
    ap.add_argument("--classes", default="sky, person, grass")
    ap.add_argument("--clip", default="clip_ViT-B-16_openai.pt")
    ap.add_argument("--dino", default="dino_vitbase16_pretrain.pth")
    ap.add_argument("--sam", default="sam_vit_b_01ec64.pth")
    ap.add_argument("--pack", default=str(ROOT))
    ap.add_argument("--limit-mb", type=float, default=150.0)
    ap.add_argument("--json", help="write the measurements and the target's verdict here")
    args = ap.parse_args()
    models = models_folder(args)
    sys.path.insert(0, str(HARNESS))
    import comfy_server
    import run_workflow
    from PIL import Image
    from skimage import data

    inputs = Path(tempfile.mkdtemp(prefix="trident_frames_"))
    Image.fromarray(data.astronaut()).resize((args.size, args.size)).save(inputs / "frame.png")
    results = []
    for n in args.frames:
        srv = comfy_server.start([args.pack], models=models, port=args.port, input_dir=str(inputs))
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
                        "rss_after_mb": round(after["VmRSS"]), "peak_rise_mb": round(after["VmHWM"] - before["VmRSS"]),
                        "rise_after_mb": round(after["VmRSS"] - before["VmRSS"])})
        print(json.dumps(results[-1]), flush=True)
    first = results[0]
    for r in results[1:]:
        print(f"{r['frames']} vs {first['frames']} frames: peak +{r['peak_mb'] - first['peak_mb']} MB, "
              f"resident after the run +{r['rss_after_mb'] - first['rss_after_mb']} MB")
    verdict = compare(results, args.limit_mb)
    print(f"target: the rise with {verdict['frames'][1]} frames exceeds that with {verdict['frames'][0]} by "
          f"{verdict['extra_peak_rise_mb']} MB (peak less resident before; limit {args.limit_mb:g} MB): "
          f"{verdict['status']}  (resident after the run: {verdict['extra_rise_after_mb']:+} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()}, "models": models,
                                               "results": results, "target": verdict}, indent=1))


if __name__ == "__main__":
    main()
