"""Load CLIP, DINO and SAM from ComfyUI's model folders, downloading a known missing file on first use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..trident_core.devices import CPU_BF16_TRADE, PRECISIONS, resolve_dtype
from ..trident_core.download import DEFAULT_FILES, ModelFileMissing, ensure_file, writable_folder
from ..trident_core.models import load_clip, load_dino, load_sam
from . import sockets as T
from .comfy_bridge import (
    FOLDERS,
    auto_dtype,
    compute_device,
    count_progress,
    find_model_file,
    io,
    model_choices,
    model_folders,
    offload_device,
    wrap_model,
)


def resolve_model_file(role: str, name: str, allow_download: bool) -> Path:
    """The selected file's path; a known file that is absent is downloaded into the role's first folder that can
    be written (an extra_model_paths folder on a read-only drive comes first where it is listed)."""
    found = find_model_file(role, name)
    if found is not None:
        return found
    folders = model_folders(role)
    try:
        return ensure_file(Path(name).name, writable_folder(folders), allow_download=None if allow_download else False,
                           progress=count_progress(), role=role)
    except ModelFileMissing as e:
        where = ", ".join(str(f) for f in folders)
        raise ModelFileMissing(f"{e} (ComfyUI model folder '{FOLDERS[role]}': {where})") from e


class _Loader(io.ComfyNode):
    """Shared loader node: a file dropdown, the precision, and whether a missing file may be downloaded."""

    ROLE = ""
    NODE_ID = ""
    TITLE = ""
    SOCKET: object
    SOCKET_TIP = ""
    ABOUT = ""
    LOAD: Callable

    @classmethod
    def define_schema(cls) -> io.Schema:
        role, folder = cls.ROLE, FOLDERS[cls.ROLE]
        return T.schema(
            cls.NODE_ID, cls.TITLE, cls.ABOUT,
            inputs=[
                io.Combo.Input("model_name", options=model_choices(role), default=DEFAULT_FILES[role],
                               tooltip=f"File in ComfyUI's models/{folder} folder (or any '{folder}' folder of "
                                       "extra_model_paths.yaml). Known files that are not there yet are listed too: "
                                       "they are downloaded on first use."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="Weight precision: auto = ComfyUI's choice for the device (fp16 where it is "
                                       "fast, bf16 or fp32 otherwise; --force-fp32 / --force-fp16 apply), fp32 on "
                                       "the CPU (exact, the reference's results). bf16 on the CPU trades exactness "
                                       f"for speed: {CPU_BF16_TRADE}; it is refused on a CPU without native "
                                       "bfloat16 (AVX512-BF16/AMX on x86, BF16 on Arm), where it would be slower. "
                                       "fp16 needs a GPU."),
                io.Boolean.Input("allow_download", default=True,
                                 tooltip="Download a known missing file from its official source into the first "
                                         f"'{folder}' folder (never when TRIDENT_NO_DOWNLOAD=1 or HF_HUB_OFFLINE=1 "
                                         "is set)."),
            ],
            outputs=[T.output(cls.SOCKET, role, cls.SOCKET_TIP)])

    @classmethod
    def execute(cls, model_name: str, precision: str, allow_download: bool) -> io.NodeOutput:
        path = resolve_model_file(cls.ROLE, model_name, allow_download)
        device = compute_device()
        dtype = resolve_dtype(precision, device, auto_dtype(device))
        model = cls.LOAD(path, offload_device(), dtype)
        return io.NodeOutput(T.ModelHandle(model, wrap_model(model.model)))

    @classmethod
    def fingerprint_inputs(cls, model_name: str | None = None, **_: object) -> object:
        """The selected file as it is on disk (a file replaced under the same name is loaded again)."""
        found = find_model_file(cls.ROLE, model_name) if model_name else None
        if found is None:
            return None
        stat = found.stat()
        return str(found.resolve()), stat.st_size, stat.st_mtime_ns


class LoadClip(_Loader):
    """CLIP loader node."""

    ROLE, NODE_ID, TITLE = "clip", "TridentLoadCLIP", "Trident Load CLIP"
    LOAD = staticmethod(load_clip)
    SOCKET = T.CLIP
    SOCKET_TIP = "The CLIP model (open_clip ViT) Trident classifies with."
    ABOUT = ("Loads a CLIP ViT (open_clip state dict or OpenAI's ViT-B-16.pt) for Trident: its text tower encodes the "
             "class names, its image tower gives the window features. It runs with the activation its weights were "
             "trained with, read off the file's name (quickgelu, openai, metaclip, dfn: QuickGELU; laion, datacomp: "
             "GELU; else by architecture).")


class LoadDino(_Loader):
    """DINO loader node."""

    ROLE, NODE_ID, TITLE = "dino", "TridentLoadDINO", "Trident Load DINO"
    LOAD = staticmethod(load_dino)
    SOCKET = T.DINO
    SOCKET_TIP = "The DINO ViT whose attention guides CLIP inside each window."
    ABOUT = ("Loads a DINO v1 ViT (dino_vitbase16_pretrain.pth or the smaller dino_deitsmall16_pretrain.pth) for "
             "Trident: its token similarities replace CLIP's last attention inside each window.")


class LoadSam(_Loader):
    """SAM loader node."""

    ROLE, NODE_ID, TITLE = "sam", "TridentLoadSAM", "Trident Load SAM"
    LOAD = staticmethod(load_sam)
    SOCKET = T.SAM
    SOCKET_TIP = "The Segment Anything model (affinity for aggregation, masks for refinement)."
    ABOUT = ("Loads Segment Anything (sam_vit_b/l/h from the shared 'sams' folder) for Trident: its encoder's "
             "last-block affinity spreads the spliced features over the whole image, and its mask decoder refines the "
             "coarse segmentation.")


NODES = (LoadClip, LoadDino, LoadSam)
