"""Command line: `python -m trident_core segment IMAGE --classes "sky, horse" --out DIR` (and `eval`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from .classes import ClassList
from .presets import PRESETS, get_preset

DEFAULT_FILES = {"clip": "ViT-B-16_openai_open_clip_model.safetensors", "dino": "dino_vitbase16_pretrain.pth",
                 "sam": "sam_vit_b_01ec64.pth"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _model_file(value: str | None, role: str, allow_download: bool) -> Path:
    """An existing path, or a known file name fetched into the cache directory (or the given folder)."""
    from .download import cache_dir, ensure_file

    if value and Path(value).is_file():
        return Path(value)
    name = Path(value).name if value else DEFAULT_FILES[role]
    folder = Path(value).parent if value and Path(value).parent != Path("") else cache_dir()
    return ensure_file(name, folder, allow_download=allow_download)


def add_model_arguments(ap: argparse.ArgumentParser, preset_and_refine: bool = True) -> None:
    """Options shared by `segment` and `eval`: models, device, precision, method parameters."""
    if preset_and_refine:
        ap.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="method parameters (default: %(default)s)")
        ap.add_argument("--refine", dest="refine", action="store_true", default=None, help="SAM refinement (S9)")
        ap.add_argument("--no-refine", dest="refine", action="store_false")
    ap.add_argument("--clip", help="CLIP checkpoint (open_clip .safetensors/.bin, or OpenAI's ViT-B-16.pt)")
    ap.add_argument("--dino", help="DINO checkpoint (dino_vitbase16_pretrain.pth)")
    ap.add_argument("--sam", help="SAM checkpoint (sam_vit_b_01ec64.pth)")
    ap.add_argument("--no-download", action="store_true", help="never download missing model files")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--sam-tiles", help="SAM tiles: auto or ROWSxCOLS (preset default: 1x1, city_scapes 1x2)")
    ap.add_argument("--correlation", choices=["affinity", "attention", "cosine", "none"])
    ap.add_argument("--paradigm", choices=["splice_then_segment", "segment_then_splice"])
    ap.add_argument("--short-side", type=int)
    ap.add_argument("--stride", type=int)
    ap.add_argument("--prob-thd", type=float)
    ap.add_argument("--mask-prompt-mode", choices=["reference", "batched"])


def build_trident(args: argparse.Namespace):
    """Load the three models named by the arguments."""
    from .pipeline import Trident

    allow = not args.no_download
    paths = {r: _model_file(getattr(args, r), r, allow) for r in ("clip", "dino", "sam")}
    t0 = time.perf_counter()
    tr = Trident.from_files(paths["clip"], paths["dino"], paths["sam"], args.device, args.precision)
    _log(f"models loaded in {time.perf_counter() - t0:.1f}s on {tr.clip.device} "
         f"(CLIP {tr.clip.arch}, DINO {tr.dino.arch}, SAM {tr.sam.arch})")
    return tr


def params_from_args(args: argparse.Namespace):
    """The preset's parameters with the command line's overrides."""
    return get_preset(args.preset).params.update(
        refine=args.refine, sam_tiles=args.sam_tiles, correlation=args.correlation, paradigm=args.paradigm,
        short_side=args.short_side, stride=args.stride, prob_thd=args.prob_thd, mask_prompt_mode=args.mask_prompt_mode)


def classes_from_args(args: argparse.Namespace) -> ClassList:
    """The class list: --classes (text or a file), else the preset's. With a benchmark preset that has a
    background class, the first given class is that background (as the reference treats line 0)."""
    text = args.classes or ""
    if text and os.path.isfile(text):
        text = Path(text).read_text(encoding="utf-8")
    return get_preset(args.preset).class_list(text, args.background)


def _save_outputs(seg, image: np.ndarray, out: Path) -> None:
    from PIL import Image

    from .render import color_labels, legend, overlay

    out.mkdir(parents=True, exist_ok=True)
    names = seg.classes.names
    colors = color_labels(seg.labels, len(names))
    Image.fromarray(np.concatenate([colors, legend(names, colors.shape[1])])).save(out / "labels_color.png")
    Image.fromarray(overlay(image, colors)).save(out / "overlay.png")
    Image.fromarray(seg.labels.clamp(min=0).cpu().numpy().astype(np.uint16 if len(names) > 255 else np.uint8)).save(
        out / "labels.png")
    masks = out / "masks"
    masks.mkdir(exist_ok=True)
    lab = seg.labels.cpu().numpy()
    for i, name in enumerate(names):
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]
        Image.fromarray(((lab == i) * 255).astype(np.uint8)).save(masks / f"{i:03d}_{safe}.png")


def save_npz(seg, path: str | os.PathLike) -> None:
    """logits (raw cosine, queries x H x W), probs, labels, class_names (+ labels_coarse/probs_coarse when refined);
    `pred`/`pred_coarse` repeat the label maps under the reference harness's names."""
    arrays = {"logits": seg.logits().cpu().numpy().astype(np.float32),
              "probs": seg.probs.cpu().numpy().astype(np.float32),
              "labels": seg.labels.cpu().numpy().astype(np.int32), "class_names": np.array(seg.classes.names),
              "query_words": np.array(seg.classes.queries), "query_idx": np.array(seg.classes.query_class)}
    if seg.refined:
        arrays["labels_coarse"] = seg.labels_coarse.cpu().numpy().astype(np.int32)
        arrays["probs_coarse"] = seg.probs_coarse.cpu().numpy().astype(np.float32)
        arrays["pred_coarse"] = arrays["labels_coarse"]
    arrays["pred"] = arrays["labels"]  # the reference harness's names for the label maps
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def cmd_segment(args: argparse.Namespace) -> int:
    from .image import to_rgb_uint8

    image = to_rgb_uint8(args.image)
    classes = classes_from_args(args)
    params = params_from_args(args)
    tr = build_trident(args)
    t0 = time.perf_counter()
    last = {"stage": ""}

    def progress(stage: str) -> None:
        if stage != last["stage"]:
            _log(f"[{time.perf_counter() - t0:6.1f}s] {stage}")
            last["stage"] = stage

    seg = tr.segment(image, classes, params, progress)
    _log(f"segmented {image.shape[1]}x{image.shape[0]} into {len(classes)} classes in {time.perf_counter() - t0:.1f}s"
         + (f" (refinement: {seg.info})" if seg.refined else ""))
    if args.out:
        _save_outputs(seg, image, Path(args.out))
        _log(f"wrote {Path(args.out) / 'labels_color.png'}, overlay.png, labels.png, masks/")
    if args.out and args.instances is not None:
        from .instances import find_instances, object_classes, write_instances

        objects = find_instances(seg.labels, object_classes(seg.classes, args.instances), seg.classes.names,
                                 args.min_area, seg.probs)
        _log(f"wrote {write_instances(objects, image.shape[:2], Path(args.out))} ({len(objects)} objects)")
    if args.save_npz:
        save_npz(seg, args.save_npz)
        _log(f"wrote {args.save_npz}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a preset on its validation set (data-parallel under torchrun)."""
    import dataclasses

    from .evaluation import build_dataset, evaluate, init_distributed

    _rank, _world, device = init_distributed()
    if args.device == "auto":
        args.device = str(device)
    dataset = build_dataset(args.preset, args.data_root)
    classes = get_preset(args.preset).classes()
    params = params_from_args(args)
    tr = build_trident(args)
    tr.text(classes)

    def predict(image: np.ndarray) -> np.ndarray:
        return tr.segment(image, classes, params).labels.cpu().numpy()

    config = {"params": dataclasses.asdict(params), "clip": tr.clip.path, "dino": tr.dino.path, "sam": tr.sam.path,
              "precision": str(tr.clip.dtype)}
    evaluate(predict, dataset, dataset.num_classes, limit=args.limit, result_json=args.out, resume=args.resume,
             config=config)  # tables use the dataset's own class names (the prompts' first synonyms differ)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trident", description="Training-free open-vocabulary segmentation (Trident)")
    sub = ap.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment one image by class names")
    seg.add_argument("image")
    seg.add_argument("--classes", help='class names: "sky, horse; pony, grass" or a file with one class per line')
    seg.add_argument("--background", help='names of a background class (label 0), e.g. "sky; wall"')
    seg.add_argument("--out", help="folder for labels_color.png, overlay.png, labels.png and masks/")
    seg.add_argument("--save-npz", help="npz with logits, probs, labels, class_names")
    seg.add_argument("--instances", nargs="?", const="", metavar="CLASSES",
                     help="also write one mask per object (connected region) of these classes (none given: every "
                          "class but the background) under --out: instances/NNN_<class>.png and instances.json")
    seg.add_argument("--min-area", type=int, default=64, help="smallest object in pixels (default: %(default)s)")
    add_model_arguments(seg)
    seg.set_defaults(func=cmd_segment)
    ev = sub.add_parser("eval", help="mIoU on a benchmark's validation set (torchrun for several processes)")
    from .evaluation import add_eval_arguments

    add_eval_arguments(ev)
    add_model_arguments(ev, preset_and_refine=False)
    ev.set_defaults(func=cmd_eval)
    args = ap.parse_args(argv)
    if args.command == "segment" and not (args.out or args.save_npz):
        ap.error("give --out DIR and/or --save-npz FILE")
    if args.command == "segment" and args.min_area < 1:
        ap.error(f"--min-area must be a whole number of pixels >= 1, not {args.min_area}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _log(f"error: {e}")
        return 2
