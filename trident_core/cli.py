"""Command line: `python -m trident_core segment IMAGE --classes "sky, horse" --out DIR` (and `eval`)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from .classes import ClassList
from .config import CORRELATIONS, MASK_PROMPT_MODES, PARADIGMS
from .devices import CPU_BF16_TRADE, PRECISIONS
from .instances import MAX_OBJECTS, MIN_AREA
from .presets import PRESETS, get_preset
from .video_run import add_video_arguments

if TYPE_CHECKING:  # (the commands import the pipeline and its models as they run)
    from .pipeline import Trident


def _log(msg: str) -> None:
    from .batch import shown

    print(shown(msg), file=sys.stderr, flush=True)


def stage_logger(t0: float) -> Callable[[str], None]:
    """Logs `[  1.2s] stage` (seconds since t0) once per stage: callers report the same stage many times."""
    last = [""]

    def log(stage: str) -> None:
        if stage != last[0]:
            _log(f"[{time.perf_counter() - t0:6.1f}s] {stage}")
            last[0] = stage
    return log


def encode_text(tr: Trident, classes: ClassList) -> None:
    """The class list's embeddings, with progress lines while names are encoded (minutes for large lists on a
    CPU; nothing is shown when they all come from the cache)."""
    from .residency import releaser

    log = stage_logger(time.perf_counter())
    tr.text(classes, lambda stage: log(f"{stage} of {len(classes.queries)} class names"),
            releaser())  # (one text block's weights resident at a time, where names are encoded)


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """warnings.showwarning for the command line: "warning: <message>" on one line."""
    _log(f"warning: {message}")


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Python's warnings and the package's logged warnings shown as "warning: <message>" lines while the command
    runs (run() only: a caller of main() keeps its own handling of both, e.g. recording them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_LineFormatter())
    package = logging.getLogger(__package__)
    shown_before, warnings.showwarning = warnings.showwarning, _warning_line
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        warnings.showwarning = shown_before


class _LineFormatter(logging.Formatter):
    """A logged record as the command line's own lines: "warning: ...", like its "error: ..."."""

    def format(self, record: logging.LogRecord) -> str:
        from .batch import shown

        return shown(f"{record.levelname.lower()}: {record.getMessage()}")


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (what is wrong, where the help is), not its usage block."""

    argv: list[str] = []  # what this parser was given (a sub-command's parser: the arguments after its name)

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's signature)
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self._took_an_input()} (`{self.prog} -h` lists the options)\n")

    def _took_an_input(self) -> str:
        """Where `--instances` (its classes optional) took the only image for its classes, that said."""
        argv = self.argv
        if "--instances" in argv[:-1] and os.path.exists(taken := argv[argv.index("--instances") + 1]):
            return f"; --instances took {taken!r} for its class names: put --instances after the images"
        return ""


def _model_file(value: str | None, role: str, allow_download: bool) -> Path:
    """An existing path, or a known file name fetched into the cache directory (or the given folder)."""
    from .download import DEFAULT_FILES, cache_dir, ensure_file

    if value and Path(value).is_file():
        return Path(value)
    if value and Path(value).is_dir():
        raise ValueError(f"--{role} {value} is a folder: give the checkpoint file in it (e.g. "
                         f"{Path(value) / DEFAULT_FILES[role]})")
    name = Path(value).name if value else DEFAULT_FILES[role]
    folder = Path(value).parent if value and Path(value).parent != Path("") else cache_dir()
    return ensure_file(name, folder, allow_download=allow_download, role=role)


def add_model_arguments(ap: argparse.ArgumentParser, preset_and_refine: bool = True) -> None:
    """Options shared by `segment` and `eval`: models, device, precision, method parameters."""
    if preset_and_refine:
        ap.add_argument("--preset", default="default", choices=sorted(PRESETS), type=str.lower,
                        help="method parameters (default: %(default)s)")
        ap.add_argument("--refine", dest="refine", action="store_true", default=None, help="SAM refinement (S9)")
        ap.add_argument("--no-refine", dest="refine", action="store_false")
    ap.add_argument("--clip", help="CLIP checkpoint (open_clip .safetensors/.bin, or OpenAI's ViT-B-16.pt)")
    ap.add_argument("--dino", help="DINO checkpoint (dino_vitbase16_pretrain.pth)")
    ap.add_argument("--sam", help="SAM checkpoint (sam_vit_b_01ec64.pth)")
    ap.add_argument("--no-download", action="store_true", help="never download missing model files")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    trade = CPU_BF16_TRADE.replace("%", "%%")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, type=str.lower,
                    help="auto: fp32 on the CPU (exact, the reference's results), fp16 on a GPU where it is fast. "
                         f"bf16 on a CPU that computes bfloat16 natively (AVX512-BF16/AMX, Arm BF16): {trade} "
                         "(docs/performance-bf16.md). fp16 needs a GPU")
    ap.add_argument("--sam-tiles", help="SAM tiles: auto or ROWSxCOLS (preset default: 1x1, city_scapes 1x2)")
    ap.add_argument("--correlation", choices=CORRELATIONS, type=str.lower)
    ap.add_argument("--paradigm", choices=PARADIGMS, type=str.lower)
    ap.add_argument("--short-side", type=int)
    ap.add_argument("--stride", type=int)
    ap.add_argument("--prob-thd", type=float)
    ap.add_argument("--mask-prompt-mode", choices=MASK_PROMPT_MODES, type=str.lower)
    ap.add_argument("--pamr-steps", type=int, help="PAMR steps on the logits before the label map (default 0: off)")
    ap.add_argument("--pamr-dilations", help="PAMR dilations, comma-separated (default 8,16)")


def check_precision(args: argparse.Namespace) -> None:
    """A precision this device refuses (bf16 on a CPU without native bfloat16, fp16 on the CPU): one line, before
    any output folder is made or model file read."""
    from .devices import resolve_device, resolve_dtype

    resolve_dtype(args.precision, resolve_device(args.device))


def build_trident(args: argparse.Namespace, params):
    """Load the models named by the arguments; SAM (and its download) only when `params` use it."""
    from .devices import resolve_device
    from .download import cache_dir
    from .pipeline import Trident, bf16_flip_cost, needs_sam

    check_precision(args)  # (its callers checked it first: here too, before any download)
    device = resolve_device(args.device)
    allow = not args.no_download
    roles = ("clip", "dino", "sam") if needs_sam(params) else ("clip", "dino")
    paths = {r: _model_file(getattr(args, r), r, allow) for r in roles}
    t0 = time.perf_counter()
    converted = cache_dir() / "converted" if device.type == "cpu" else None  # bf16 copies, made once per file
    tr = Trident.from_files(paths["clip"], paths["dino"], paths.get("sam"), device, args.precision, converted,
                            params.aggregation)
    tr.clip.disk_cache = text_cache_dir()
    _log(f"models loaded in {time.perf_counter() - t0:.1f}s on {tr.clip.device} "
         f"(CLIP {tr.clip.arch}, DINO {tr.dino.arch}, " + (f"SAM {tr.sam.arch})" if tr.sam else "no SAM needed)"))
    if tr.sam and tr.sam.dtype != tr.clip.dtype:  # sam_dtype kept it float32 in bf16 mode
        _log(f"SAM stays fp32: {bf16_flip_cost(params.aggregation)} (CLIP and DINO run bf16)")
    return tr


def text_cache_dir() -> Path:
    """Where the command line keeps text embeddings between runs (under the model cache directory)."""
    from .download import cache_dir

    return cache_dir() / "text-embeddings"


def release_text_tower(clip) -> None:
    """Unmap the resident pages of CLIP's text tower once the classes are encoded: the images never use it (its
    weights stay valid and are mapped again if asked; see residency.py)."""
    from torch import nn

    from .residency import release

    parts = [getattr(clip.model, name, None) for name in
             ("token_embedding", "positional_embedding", "text_projection", "transformer", "ln_final")]
    release([t for p in parts if p is not None for t in (p.parameters() if isinstance(p, nn.Module) else [p])])


def params_from_args(args: argparse.Namespace):
    """The preset's parameters with the command line's overrides (each stage's config checks its own)."""
    from .pamr import parse_dilations

    return get_preset(args.preset).params.update(
        refine=args.refine, sam_tiles=args.sam_tiles, correlation=args.correlation, paradigm=args.paradigm,
        short_side=args.short_side, stride=args.stride, prob_thd=args.prob_thd, mask_prompt_mode=args.mask_prompt_mode,
        pamr_steps=args.pamr_steps,
        pamr_dilations=parse_dilations(args.pamr_dilations) if args.pamr_dilations is not None else None)


def classes_from_args(args: argparse.Namespace) -> ClassList:
    """The class list: --classes as typed text (commas and line breaks separate classes, all foreground) or a
    class file (one class per line; line 0 is the background with a preset that has one), else the preset's."""
    text = args.classes or ""
    preset = get_preset(args.preset)
    if text and os.path.isfile(text):
        return preset.class_list_from_file(text, args.background)
    if _names_a_file(text):
        raise ValueError(f"--classes {text}: no such class file; give a text file with one class per line, or class "
                         "names separated by commas")
    return preset.class_list(text, args.background)


def _names_a_file(text: str) -> bool:
    """Whether --classes reads as a path rather than names: one entry (no separator) that ends in .txt or holds a
    path separator. A misspelt class file was taken for one class named by its path."""
    one_entry = not any(c in text for c in ",;\r\n")
    return one_entry and (text.lower().endswith(".txt") or "/" in text or "\\" in text)


def _settings(tr, classes: ClassList, params) -> dict:
    """What decides an image's outputs besides the image (stored in each output's completion marker): the models
    by content (size and SHA-256, hashed once per file and remembered), so other weights under the same name and
    size are never taken for the ones that made an output."""
    from .file_digest import file_digest

    models = {role: [Path(m.path).name, file_digest(m.path, text_cache_dir())] for role, m in
              (("clip", tr.clip), ("dino", tr.dino), ("sam", tr.sam)) if m is not None}
    return {"format": 1, "classes": classes.names, "queries": list(classes.queries),
            "background": classes.has_background, "params": params.flat(), "models": models,
            "quick_gelu": tr.clip.quick_gelu, "dtype": str(tr.clip.dtype), "device": tr.clip.device.type}


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment the images (a path, folder, glob or @list) and write each one's outputs (see the README)."""
    from .batch import EXIT_SKIPPED, Destinations, check_destinations, run
    from .evaluation.distributed import all_reduce, init_distributed
    from .image import to_rgb_uint8
    from .image_list import gather
    from .outputs import planned_files
    from .paths import require_output_file, require_output_folder
    from .video_run import check_image_run, is_video_run, segment_video

    check_precision(args)
    if is_video_run(args):
        return segment_video(args)
    check_image_run(args)
    out = Path(args.out) if args.out else None
    npz = Path(args.save_npz) if args.save_npz else None
    jobs, single = gather(args.images)
    if single:
        to_rgb_uint8(jobs[0].path)  # an unreadable single image is an error before the models load
    elif npz is not None and npz.suffix.lower() == ".npz":
        raise ValueError(f"--save-npz {npz}: with several images, give a folder (each image's npz goes there)")
    classes = classes_from_args(args)  # (a class list refused before any output folder is made)
    params = params_from_args(args)
    if out is not None:
        require_output_folder(args.out, "--out")
    if npz is not None and (not single or args.save_npz.endswith(("/", os.sep)) or npz.is_dir()):
        require_output_folder(args.save_npz, "--save-npz")  # (one image into a folder: FOLDER/<image name>.npz)
    elif npz is not None:
        require_output_file(args.save_npz, "--save-npz", "result.npz")
    extra = _instances_writer(args, classes)
    dest = Destinations(out, npz, single, extra, tuple(planned_files(classes.names, extra is not None)),
                        frozenset(os.path.realpath(job.path) for job in jobs))
    check_destinations(jobs, dest)
    rank, world, device = init_distributed()
    if args.device == "auto":
        args.device = str(device)
    tr = build_trident(args, params)
    encode_text(tr, classes)
    release_text_tower(tr.clip)
    tr.release_weights = True  # the CPU's peak holds one stage's weights (residency.py)
    per_forward = functools.partial(tr.frames_per_forward, params)  # several images per forward on a GPU
    t0 = time.perf_counter()
    progress = stage_logger(t0)

    def segment(images: Iterable[np.ndarray]) -> Iterator:
        """Each image's segmentation, in order; on a GPU consecutive images of one size share forwards."""
        return tr.segment_frames(images, classes, params, progress if single else lambda _stage: None,
                                 per_forward=per_forward)

    counts = run(segment, jobs, dest,
                 _settings(tr, classes, params) | _instances_settings(args), rank=rank,
                 world=world, resume=not args.overwrite, log=_log, show_progress=not single)
    done, complete, unreadable = (int(v) for v in all_reduce(
        np.array([counts.segmented, counts.complete, counts.unreadable], np.int64)))
    if rank == 0:
        where = ", ".join(str(p) for p in (out, npz) if p is not None)
        _log(f"{done} segmented in {time.perf_counter() - t0:.1f}s, {complete} already complete, "
             f"{unreadable} skipped (unreadable or failed) -> {where}")
    _finish_distributed()
    return EXIT_SKIPPED if unreadable else 0


def _instance_options(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """Check --min-area and --max-objects and fill in their defaults; refused without --instances (they were
    silently ignored)."""
    given = [flag for flag, value in (("--min-area", args.min_area), ("--max-objects", args.max_objects))
             if value is not None]
    if given and args.instances is None:
        ap.error(f"{given[0]} is for --instances (the objects' masks): add --instances, or leave it out")
    args.min_area = MIN_AREA if args.min_area is None else args.min_area
    args.max_objects = MAX_OBJECTS if args.max_objects is None else args.max_objects
    if args.min_area < 1:
        ap.error(f"--min-area must be a whole number of pixels >= 1, not {args.min_area}")
    if args.max_objects < 1:
        ap.error(f"--max-objects must be a whole number >= 1, not {args.max_objects}")


def _instances_writer(args: argparse.Namespace, classes: ClassList):
    """With --instances, the writer of each image's objects (instances/ and instances.json); checked first."""
    if args.instances is None:
        return None
    from .classes import named_classes
    from .instances import find_largest_instances, write_instances

    if not args.out:
        raise ValueError("--instances writes its masks under --out: give --out DIR")
    try:
        wanted = named_classes(classes, args.instances)
    except ValueError as e:
        if os.path.exists(args.instances):  # `--instances IMAGE ...`: argparse took an image for the classes
            raise ValueError(f"--instances took {args.instances!r} for class names, but it is a file or folder: "
                             "put --instances after the images") from e
        raise
    min_area, max_objects = args.min_area, args.max_objects

    def write(seg, image: np.ndarray, folder: Path) -> None:
        objects, dropped = find_largest_instances(seg.labels, wanted, seg.classes.names, min_area, seg.probs,
                                                  max_objects=max_objects)
        if dropped:
            _log(f"instances: kept the {max_objects} largest of {max_objects + dropped} objects, dropped {dropped} "
                 "smaller ones (raise --max-objects to keep more)")
        write_instances(objects, image.shape[:2], folder)

    return write


def _instances_settings(args: argparse.Namespace) -> dict:
    """What --instances adds to the outputs' key (nothing without it, so earlier outputs stay complete)."""
    return {} if args.instances is None else {"instances": args.instances, "min_area": args.min_area,
                                              "max_objects": args.max_objects}


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a preset on its validation set (data-parallel under torchrun)."""
    from .checkpoints import file_sha256
    from .evaluation import build_dataset, evaluate, init_distributed
    from .evaluation.runner import check_outputs_free

    check_precision(args)
    if args.out:
        from .paths import require_output_file

        require_output_file(args.out, "--out")
    rank, world, device = init_distributed()
    if args.out:
        check_outputs_free(Path(args.out), rank, world)  # before the models load
    if args.device == "auto":
        args.device = str(device)
    dataset = build_dataset(args.preset, args.data_root)
    classes = get_preset(args.preset).classes()
    params = params_from_args(args)
    tr = build_trident(args, params)
    encode_text(tr, classes)

    def predict(image: np.ndarray) -> np.ndarray:
        return tr.segment(image, classes, params).labels.cpu().numpy()

    # A resume state belongs to this exact run: the models' contents (whatever their paths are called), the class
    # names prompted, parameters, precision and kind of device (whose rounding differs). The result also names the
    # model files (absolute paths), which a resume does not compare.
    models = {"clip": tr.clip.path, "dino": tr.dino.path, **({"sam": tr.sam.path} if tr.sam else {})}
    config = {"params": params.flat(), "classes": [list(c) for c in classes.classes],
              "background": classes.has_background, "quick_gelu": tr.clip.quick_gelu,
              **{f"{role}_sha256": file_sha256(path) for role, path in models.items()},
              "precision": str(tr.clip.dtype), "device": tr.clip.device.type}
    # tables use the dataset's own class names (the prompts' first synonyms differ)
    evaluate(predict, dataset, dataset.num_classes, limit=args.limit, result_json=args.out, resume=args.resume,
             config=config, ignore_index=dataset.ignore_index,
             about={"models": {role: os.path.abspath(path) for role, path in models.items()}})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="trident", description="Training-free open-vocabulary segmentation (Trident)")
    sub = ap.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment images by class names (torchrun for several processes)")
    seg.add_argument("images", nargs="+", metavar="IMAGE",
                     help="image files, folders (their images, also in sub-folders), glob patterns ('**' spans "
                          "folders) or @LIST (a text file naming one image per line)")
    seg.add_argument("--classes", help='class names: "sky, horse; pony, grass" (commas or line breaks between '
                     'classes) or a class file (one class per line, commas part of a name; line 0 is the '
                     'background with voc21, context60, coco_object)')
    seg.add_argument("--background", help='names of one background class (label 0), e.g. "sky; wall" (or "sky, '
                                           'wall": one class)')
    seg.add_argument("--out", help="folder for labels_color.png, overlay.png, labels.png and masks/ (several "
                                   "images: one sub-folder per image, named by its path)")
    seg.add_argument("--save-npz", help="npz with logits, probs, labels, class_names (several images: a folder)")
    seg.add_argument("--overwrite", action="store_true",
                     help="segment every image again (default: skip images whose outputs are complete)")
    seg.add_argument("--instances", nargs="?", const="", metavar="CLASSES",
                     help="also write one mask per object (connected region) of these classes (none given: every "
                          "class but the background) under --out: instances/NNN_<class>.png and instances.json")
    seg.add_argument("--min-area", type=int, help=f"with --instances: smallest object in pixels (default: {MIN_AREA})")
    seg.add_argument("--max-objects", type=int,
                     help=f"with --instances: most objects written per image, the largest (default: {MAX_OBJECTS}); a "
                          "line says how many smaller ones were dropped")
    add_model_arguments(seg)
    add_video_arguments(seg)
    seg.set_defaults(func=cmd_segment)
    ev = sub.add_parser("eval", help="mIoU on a benchmark's validation set (torchrun for several processes)")
    from .evaluation import add_eval_arguments

    add_eval_arguments(ev)
    add_model_arguments(ev, preset_and_refine=False)
    ev.set_defaults(func=cmd_eval)
    args = ap.parse_args(argv)
    for option in ("out", "save_npz"):
        if getattr(args, option, None) == "":
            ap.error(f"--{option.replace('_', '-')} needs a path")
    if args.command == "segment" and not (args.out or args.save_npz):
        ap.error("give --out DIR and/or --save-npz FILE")
    if args.command == "segment":
        _instance_options(args, ap)
    with _sigterm_as_interrupt():
        try:
            return args.func(args)
        except (ValueError, OSError, RuntimeError) as e:  # a write error too (a full disk): one line, no traceback
            _log(f"error: {e}")
            _finish_distributed()
            return 2
        except KeyboardInterrupt as e:
            how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            if args.command == "eval":
                _log(f"{how}: " + ("the images done are kept in the resume state beside --out; run the same "
                                   "command again to go on" if args.out else "nothing is kept without --out"))
            else:
                _log(f"{how}: the outputs already complete are kept; run the same command again to go on (a clip "
                     "starts again from its first frame)")
            return 143 if isinstance(e, Terminated) else 130


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or torchrun ending the job) met as Ctrl+C is: what is done is saved on the way out."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread while a command runs (its default ends the process at once,
    skipping every `finally`: an evaluation lost the images done since its last periodic save)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(_signum: int, _frame: object) -> None:
        raise Terminated

    before = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run() -> NoReturn:
    """The command's entry point (`trident`, `python -m trident_core`): main(), then the process ends at once with
    its streams flushed. Nothing of ours is left open by then (outputs are written and renamed, the process group
    is gone), while tearing down the imported libraries' modules would take most of a second. FFmpeg's own log
    lines are off (a broken video gets our one line only) unless OPENCV_FFMPEG_LOGLEVEL says otherwise."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # (AV_LOG_QUIET; read when OpenCV first opens a video)
    with one_line_warnings():  # (the timings' own warning too: a cache folder it cannot write)
        code = main()
        timing = sys.modules.get(f"{__package__}.kernels.timing")  # loaded with the models, if they were
        if timing is not None:
            timing.flush()  # what was timed last (os._exit runs no exit handlers)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

