"""Load CLIP, DINO and SAM from ComfyUI's model folders, downloading a known missing file on first use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..trident_core.devices import CPU_BF16_TRADE, PRECISIONS, resolve_dtype
from ..trident_core.download import DEFAULT_FILES, ModelFileMissing, ensure_file
from ..trident_core.models import load_clip, load_dino, load_sam
from . import sockets as T
from .comfy_bridge import (
    FOLDERS,
    auto_dtype,
    compute_device,
    count_progress,
    find_model_file,
    model_choices,
    model_folders,
    offload_device,
    wrap_model,
)


def resolve_model_file(role: str, name: str, allow_download: bool) -> Path:
    """The selected file's path; a known file that is absent is downloaded into the role's first folder."""
    found = find_model_file(role, name)
    if found is not None:
        return found
    folders = model_folders(role)
    try:
        return ensure_file(Path(name).name, folders[0], allow_download=None if allow_download else False,
                           progress=count_progress())
    except ModelFileMissing as e:
        where = ", ".join(str(f) for f in folders)
        raise ModelFileMissing(f"{e} (ComfyUI model folder '{FOLDERS[role]}': {where})") from e


class _Loader:
    """Shared loader node: a file dropdown, the precision, and whether a missing file may be downloaded."""

    ROLE = ""
    CATEGORY = T.CATEGORY
    FUNCTION = "load"
    LOAD: Callable

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        role, folder = cls.ROLE, FOLDERS[cls.ROLE]
        return {"required": {
            "model_name": (model_choices(role), {
                "default": DEFAULT_FILES[role],
                "tooltip": f"File in ComfyUI's models/{folder} folder (or any '{folder}' folder of "
                           "extra_model_paths.yaml). Known files that are not there yet are listed too: they are "
                           "downloaded on first use."}),
            "precision": (list(PRECISIONS), {
                "default": "auto",
                "tooltip": "Weight precision: auto = ComfyUI's choice for the device (fp16 where it is fast, "
                           "bf16 or fp32 otherwise; --force-fp32 / --force-fp16 apply), fp32 on the CPU (exact). "
                           "bf16 on a CPU that computes bfloat16 natively (AVX512-BF16/AMX, Arm BF16): "
                           f"{CPU_BF16_TRADE}. fp16 needs a GPU."}),
            "allow_download": ("BOOLEAN", {
                "default": True,
                "tooltip": "Download a known missing file from its official source into the first "
                           f"'{folder}' folder (never when TRIDENT_NO_DOWNLOAD=1 or HF_HUB_OFFLINE=1 is set)."}),
        }}

    def load(self, model_name: str, precision: str, allow_download: bool) -> tuple[T.ModelHandle]:
        path = resolve_model_file(self.ROLE, model_name, allow_download)
        device = compute_device()
        dtype = resolve_dtype(precision, device, auto_dtype(device))
        model = type(self).LOAD(path, offload_device(), dtype)
        return (T.ModelHandle(model, wrap_model(model.model)),)


class LoadClip(_Loader):
    """CLIP loader node."""

    ROLE = "clip"
    LOAD = staticmethod(load_clip)
    RETURN_TYPES = (T.CLIP,)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The CLIP model (open_clip ViT) Trident classifies with.",)
    DESCRIPTION = ("Loads a CLIP ViT (open_clip state dict or OpenAI's ViT-B-16.pt) for Trident: its text tower "
                   "encodes the class names, its image tower gives the window features. OpenAI weights run with "
                   "QuickGELU as they were trained.")


class LoadDino(_Loader):
    """DINO loader node."""

    ROLE = "dino"
    LOAD = staticmethod(load_dino)
    RETURN_TYPES = (T.DINO,)
    RETURN_NAMES = ("dino",)
    OUTPUT_TOOLTIPS = ("The DINO ViT whose attention guides CLIP inside each window.",)
    DESCRIPTION = ("Loads a DINO v1 ViT (dino_vitbase16_pretrain.pth or the smaller dino_deitsmall16_pretrain.pth) "
                   "for Trident: its token similarities replace CLIP's last attention inside each window.")


class LoadSam(_Loader):
    """SAM loader node."""

    ROLE = "sam"
    LOAD = staticmethod(load_sam)
    RETURN_TYPES = (T.SAM,)
    RETURN_NAMES = ("sam",)
    OUTPUT_TOOLTIPS = ("The Segment Anything model (affinity for aggregation, masks for refinement).",)
    DESCRIPTION = ("Loads Segment Anything (sam_vit_b/l/h from the shared 'sams' folder) for Trident: its "
                   "encoder's last-block affinity spreads the spliced features over the whole image, and its mask "
                   "decoder refines the coarse segmentation.")


NODE_CLASS_MAPPINGS = {"TridentLoadCLIP": LoadClip, "TridentLoadDINO": LoadDino, "TridentLoadSAM": LoadSam}
NODE_DISPLAY_NAME_MAPPINGS = {"TridentLoadCLIP": "Trident Load CLIP", "TridentLoadDINO": "Trident Load DINO",
                              "TridentLoadSAM": "Trident Load SAM"}
