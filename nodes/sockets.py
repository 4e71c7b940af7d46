"""The custom socket types the nodes pass between them (V3 `io.Custom` types: the TRIDENT_* names saved workflows'
links carry), the small containers behind them, and the checks every node shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..trident_core.classes import ClassList
from ..trident_core.config import AggregateConfig, WindowConfig
from ..trident_core.image import check_float_range
from ..trident_core.models import ClipModel, DinoModel, SamModel
from ..trident_core.window_features import WindowFeatures
from .comfy_bridge import io, load_models

CATEGORY = "segmentation/trident"

CLIP = io.Custom("TRIDENT_CLIP")  # ModelHandle
DINO = io.Custom("TRIDENT_DINO")  # ModelHandle
SAM = io.Custom("TRIDENT_SAM")  # ModelHandle
CLASSES = io.Custom("TRIDENT_CLASSES")  # EncodedClasses
WINDOW_FEATURES = io.Custom("TRIDENT_WINDOW_FEATURES")  # WindowFeatureBatch
FEATURE_MAP = io.Custom("TRIDENT_FEATURE_MAP")  # list[FeatureMap], one per batch image
SAM_ENCODING = io.Custom("TRIDENT_SAM_ENCODING")  # list[SamTileEncodings | None], one per batch image
SEGMENTATION = io.Custom("TRIDENT_SEGMENTATION")  # list[Segmentation], one per batch image
SEGS = io.Custom("SEGS")  # Impact-Pack's SEGS


SEGMENTATION_TIP = "From Trident Segment, Classify or SAM Refine."


def schema(node_id: str, title: str, description: str, inputs: list, outputs: list) -> object:
    """A Trident node's V3 schema: id (the saved workflows' node type), title, description, sockets; its
    category is the pack's."""
    return io.Schema(node_id=node_id, display_name=title, category=CATEGORY, description=description, inputs=inputs,
                     outputs=outputs)


def output(socket: object, name: str, tooltip: str, is_list: bool = False) -> object:
    """An output socket shown as `name` (with `is_list`, a list: the nodes it feeds run once per item). Its id is
    `name` + "_out": ComfyUI 0.3.48 wants output ids apart from input ids (Encode Classes takes and gives
    `classes`), and shows the type where no display name is given."""
    return socket.Output(f"{name}_out", display_name=name, tooltip=tooltip, is_output_list=is_list)


def short_side_input(tooltip: str, optional: bool = False, same: bool = False) -> object:
    """The short side the image is scaled to, with Window Features' default and range; with `same`, 0 (the
    default) means the one the connected result was made at."""
    default, low = (0, 0) if same else (WindowConfig().short_side, 112)
    return io.Int.Input("short_side", default=default, min=low, max=2048, step=16, tooltip=tooltip,
                        optional=optional)


def aggregation_inputs(cos_tip: str, neg_tip: str) -> list:
    """cos_fac and refine_neg_cos with Splice & Aggregate's defaults (it and Inspect Point Affinity take them)."""
    defaults = AggregateConfig()
    return [io.Float.Input("cos_fac", default=defaults.cos_fac, min=-10.0, max=10.0, step=0.05, tooltip=cos_tip),
            io.Boolean.Input("refine_neg_cos", default=defaults.refine_neg_cos, tooltip=neg_tip)]


def refusal(check: Callable[[], object]) -> bool | str:
    """What a node's validate_inputs answers ComfyUI: True when `check()` passes, else its error's one line."""
    try:
        check()
    except ValueError as e:
        return str(e)
    return True


@dataclass(eq=False)
class ModelHandle:
    """A loaded model (trident_core wrapper) and the ComfyUI ModelPatcher that moves it on and off the GPU."""

    model: ClipModel | DinoModel | SamModel
    patcher: object | None = None


def images(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """The IMAGE batch, refused when it holds no image (every output would be empty) or is not laid out as ComfyUI's
    [batch, height, width, channels] (a lone frame or a channels-first tensor would run as rows of gray images)."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"the '{name}' input has shape {list(image.shape)}, not an IMAGE batch [batch, height, width, "
                         "channels] with 1, 3 or 4 channels: connect an IMAGE output (e.g. Load Image)")
    if image.device.type == "meta":
        raise ValueError(f"the '{name}' input holds no pixel values (a tensor on the 'meta' device): connect an IMAGE "
                         "output (e.g. Load Image)")
    if image.shape[0] and 0 in image.shape[1:3]:
        raise ValueError(f"the '{name}' input's images are empty ({image.shape[2]}x{image.shape[1]} pixels): connect "
                         "images of at least 1x1 pixel")
    if image.is_floating_point() and image.numel():  # the whole batch at once: frame k's fault is not met late
        if not torch.isfinite(image).all():
            raise ValueError(f"the '{name}' input contains NaN or infinite values: fix the node that made it")
        check_float_range(float(image.max()), float(image.min()))
    if image.shape[0] == 0:
        raise ValueError(f"the '{name}' input is an IMAGE batch of 0 images: connect a node that gives at least one "
                         "image (e.g. Load Image)")
    return image


def items(batch: list, what: str) -> list:
    """A per-image list from an earlier Trident node, refused when empty (made from an IMAGE batch of 0 images)."""
    if not batch:
        raise ValueError(f"the {what} holds no image (it was made from an IMAGE batch of 0 images): connect at least "
                         "one image to the first Trident node")
    return batch


def ready(*handles: ModelHandle) -> None:
    """Put the models on the compute device (ComfyUI may have offloaded them for another model meanwhile), with
    room for the step's working memory."""
    widest = max((h.model.dtype for h in handles), key=lambda d: torch.empty((), dtype=d).element_size(),
                 default=torch.float16)
    load_models([h.patcher for h in handles], widest)


@dataclass(frozen=True, eq=False)
class EncodedClasses:
    """A class list, the CLIP text embeddings of its queries [Q, E] and that CLIP (`ClipModel.identity`)."""

    classes: ClassList
    text: torch.Tensor
    made_by: str = ""


@dataclass(frozen=True, eq=False)
class WindowFeatureBatch:
    """Window features of each batch image, and the CLIP they came from (Splice & Aggregate projects the spliced
    features with its ln_post and projection)."""

    items: tuple[WindowFeatures, ...]
    clip: ModelHandle
