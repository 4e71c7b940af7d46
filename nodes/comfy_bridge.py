"""Everything the nodes need from ComfyUI, imported lazily, with plain fallbacks so the nodes run without it.

Inside ComfyUI: the V3 node API (`comfy_api.latest`: `io`, `ComfyExtension`), model folders from `folder_paths`
(registered with `add_model_folder_path`, so users' extra_model_paths.yaml keeps working), devices and VRAM
management from `comfy.model_management`, progress bars from `comfy.utils`. Without ComfyUI (tests, scripts): our
stand-in of the V3 API (v3_standin), the CPU, no progress bar, and model folders under $TRIDENT_MODELS_DIR (default:
trident_core's cache folder)."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch

from ..trident_core.download import MODELS, cache_dir
from ..trident_core.residency import trim_heap

# role -> folder_paths name, which is also the sub-folder of ComfyUI's models/ folder
FOLDERS = {"clip": "open_clip", "dino": "dino", "sam": "sams"}
EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin")
R = TypeVar("R")


_ABSENT: set[str] = set()  # ComfyUI modules found missing: importing one searches the whole path again each time


def _comfy(name: str) -> ModuleType | None:
    """A ComfyUI module, or None when the nodes run outside ComfyUI (asked per frame: a module found missing is
    not searched for again, which took 2 ms a frame, unless it is imported since)."""
    if name in _ABSENT and name not in sys.modules:
        return None
    try:
        return importlib.import_module(name)  # (waits for a module another thread is still importing)
    except ImportError:
        _ABSENT.add(name)
        return None


# ------------------------------------------------------------------------------------------------------- V3 API

MIN_COMFYUI = "0.3.48"
"""The first ComfyUI release with the V3 node API (comfy_api.latest) the nodes are written in."""


def _v3_api() -> tuple[object, type, bool]:
    """(io, ComfyExtension, True) from ComfyUI's comfy_api.latest, or from our stand-in with False."""
    api = _comfy("comfy_api.latest")
    if api is None:
        from . import v3_standin as api
    return api.io, api.ComfyExtension, api.__name__ == "comfy_api.latest"


io, ComfyExtension, COMFY_V3 = _v3_api()


def comfyui_without_v3() -> bool:
    """True inside a ComfyUI older than MIN_COMFYUI: its modules are there, its V3 node API is not."""
    return not COMFY_V3 and _comfy("folder_paths") is not None


# ------------------------------------------------------------------------------------------------------ folders

def _fallback_root() -> Path:
    return Path(os.environ.get("TRIDENT_MODELS_DIR") or cache_dir()).expanduser()


def model_folders(role: str) -> list[Path]:
    """The folders searched for a role's model files, first = where downloads go."""
    name = FOLDERS[role]
    fp = _comfy("folder_paths")
    if fp is None:
        return [_fallback_root() / name]
    fp.add_model_folder_path(name, os.path.join(fp.models_dir, name))
    return [Path(p) for p in fp.get_folder_paths(name)]


def local_model_files(role: str) -> list[str]:
    """Model files present in the role's folders (relative paths, sub-folders included)."""
    fp = _comfy("folder_paths")
    if fp is not None:
        model_folders(role)
        files = fp.get_filename_list(FOLDERS[role])
    else:
        files = [p.relative_to(folder).as_posix() for folder in model_folders(role) if folder.is_dir()
                 for p in folder.rglob("*") if p.is_file()]
    return sorted({f for f in files if f.lower().endswith(EXTENSIONS)})


def model_choices(role: str) -> list[str]:
    """The loader's dropdown: files present, then the known downloadable files of that role that are absent."""
    present = local_model_files(role)
    known = [m.filename for m in MODELS.values() if m.role == role and m.filename not in present]
    return present + known


def find_model_file(role: str, name: str) -> Path | None:
    """The full path of a model file in the role's folders, or None. A bare file name (as example workflows give
    it) also finds that file in a sub-folder."""
    fp = _comfy("folder_paths")
    if fp is not None:
        model_folders(role)
        found = fp.get_full_path(FOLDERS[role], name)
    else:
        found = next((f / name for f in model_folders(role) if (f / name).is_file()), None)
    if found is None and "/" not in name:
        nested = next((f for f in local_model_files(role) if Path(f).name == name), None)
        return find_model_file(role, nested) if nested else None
    return Path(found) if found else None


# ------------------------------------------------------------------------------------------------------ devices

def compute_device() -> torch.device:
    """Where models run: ComfyUI's torch device, else the CPU."""
    mm = _comfy("comfy.model_management")
    return mm.get_torch_device() if mm else torch.device("cpu")


def offload_device() -> torch.device:
    """Where idle models wait: ComfyUI's offload device, else the CPU."""
    mm = _comfy("comfy.model_management")
    return mm.unet_offload_device() if mm else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where node outputs live between nodes: ComfyUI's intermediate device, else the CPU."""
    mm = _comfy("comfy.model_management")
    return mm.intermediate_device() if mm else torch.device("cpu")


def auto_dtype(device: torch.device) -> torch.dtype | None:
    """ComfyUI's choice of weight dtype for `device` (should_use_fp16 / should_use_bf16, which honour
    --force-fp32 and --force-fp16), or None outside ComfyUI."""
    mm = _comfy("comfy.model_management")
    if mm is None:
        return None
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


def to_device(obj: object, device: torch.device, _memo: dict | None = None) -> object:
    """`obj` with every tensor moved to `device`, through dataclasses, lists, tuples and dicts; objects shared
    inside `obj` stay shared, and anything already there is returned as is."""
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    out = obj
    if isinstance(obj, torch.Tensor):
        out = obj.to(device)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = {f.name: to_device(getattr(obj, f.name), device, memo) for f in dataclasses.fields(obj) if f.init}
        if any(v is not getattr(obj, k) for k, v in new.items()):
            out = dataclasses.replace(obj, **new)
    elif type(obj) in (list, tuple):
        new = [to_device(v, device, memo) for v in obj]
        if any(a is not b for a, b in zip(new, obj)):
            out = type(obj)(new)
    elif isinstance(obj, dict):
        new = {k: to_device(v, device, memo) for k, v in obj.items()}
        if any(new[k] is not obj[k] for k in obj):
            out = new
    memo[id(obj)] = out
    return out


def to_intermediate(obj: object) -> object:
    """A node output on ComfyUI's intermediate device (the CPU unless --gpu-only), so cached outputs hold no VRAM."""
    return to_device(obj, intermediate_device())


# ---------------------------------------------------------------------------------------------------- patchers

class _Holder(torch.nn.Module):
    """Holds a model for ComfyUI's ModelPatcher, which sets a `device` attribute that some models (SAM) have as a
    read-only property."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


def wrap_model(module: torch.nn.Module) -> object | None:
    """A ComfyUI ModelPatcher for `module` (so ComfyUI can offload it when another model needs the VRAM), or
    None outside ComfyUI."""
    mp = _comfy("comfy.model_patcher")
    if mp is None:
        return None
    return mp.ModelPatcher(_Holder(module), load_device=compute_device(), offload_device=offload_device())


STEP_MEMORY_FP16 = 1 << 30
"""Working memory of one Trident step beyond the weights, in float16: measured peaks are 1.0 to 1.5 GB on a GPU with
0.65 GB of weights (voc21, refinement included); float32 needs twice that."""


def step_memory(dtype: torch.dtype) -> int:
    """The memory estimate ComfyUI frees room for before a step runs with models of `dtype`."""
    return STEP_MEMORY_FP16 * max(1, torch.empty((), dtype=dtype).element_size()) // 2


def load_models(patchers: list[object | None], dtype: torch.dtype = torch.float16) -> None:
    """Move the models onto the compute device through ComfyUI's model management, with the step's memory
    estimate (ComfyUI offloads other models to make room), fully: plain torch modules cannot run partly offloaded.
    Under --novram ComfyUI keeps them on the offload device, whole, and they run there."""
    todo = [p for p in patchers if p is not None]
    mm = _comfy("comfy.model_management")
    if todo and mm is not None:
        mm.load_models_gpu(todo, memory_required=step_memory(dtype), force_full_load=True)


# ---------------------------------------------------------------------------------------------------- progress

def check_interrupt() -> None:
    """Raise ComfyUI's interruption exception when the user pressed Cancel."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class _NoBar:
    """The progress bar outside ComfyUI: does nothing."""

    def __init__(self, total: int) -> None:
        self.total = total

    def update(self, value: int) -> None:
        return None

    def update_absolute(self, value: int, total: int | None = None, preview: object = None) -> None:
        return None


def progress_bar(total: int) -> object:
    """ComfyUI's progress bar for the running node (update / update_absolute), or a no-op."""
    cu = _comfy("comfy.utils")
    return cu.ProgressBar(total) if cu else _NoBar(total)


class Progress:
    """A node's progress over a batch: `step()` after each image; calling it (the core's stage callback) checks
    for cancellation, so a long image can be stopped between stages."""

    def __init__(self, total: int) -> None:
        self.bar = progress_bar(max(1, total))

    def __call__(self, _stage: str = "") -> None:
        check_interrupt()

    def step(self) -> None:
        check_interrupt()
        self.bar.update(1)


def each_image(fn: Callable[..., R], *batches: Sequence) -> list[R]:
    """`fn(*items, progress)` for each image of the batch (the batches zipped, in order), with one progress bar:
    it advances after each image, and Cancel is honoured between images and, through `progress`, between stages.
    Whatever `fn` holds for an image is freed, and the freed heap given back, before the next image starts (so the
    server's memory does not creep with the frames)."""
    return each_result(lambda progress: (fn(*items, progress) for items in zip(*batches)), len(batches[0]))


TRIM_EVERY_S = 0.25  # the freed heap given back after an image at most this often (a trim takes a few ms)
_last_trim = [float("-inf")]


def trim_paced() -> None:
    """`trim_heap` unless it ran less than TRIM_EVERY_S ago: after every image where an image takes longer (the
    CPU), every few frames where frames take milliseconds (a GPU's batches), the heap's growth bounded either way."""
    now = time.monotonic()
    if now - _last_trim[0] >= TRIM_EVERY_S:
        trim_heap()
        _last_trim[0] = time.monotonic()


def each_result(results: Callable[[Progress], Iterator[R]], total: int) -> list[R]:
    """The `total` results `results(progress)` yields (one per image, e.g. frames sharing forwards), with
    `each_image`'s progress bar, cancellation and freed heap after each (`trim_paced`)."""
    progress = Progress(total)
    out = []
    for result in results(progress):
        out.append(result)
        trim_paced()
        progress.step()
    trim_heap()  # (the last frames' freed heap too, whenever the last paced trim was)
    return out


def free_memory(device: torch.device) -> int | None:
    """The memory free for work on a GPU `device` as ComfyUI counts it (its allocator's cache included), or None
    (the CPU, or outside ComfyUI: CUDA's own figure is used then)."""
    mm = _comfy("comfy.model_management")
    if device.type == "cpu" or mm is None or not hasattr(mm, "get_free_memory"):
        return None
    return int(mm.get_free_memory(device))


def count_progress() -> object:
    """A `(done, total)` callback (bytes downloaded, class names encoded) that drives a progress bar and lets the
    user cancel."""
    bar = progress_bar(1)

    def report(done: int, total: int | None) -> None:
        check_interrupt()
        if total:
            bar.update_absolute(done, total)

    return report
