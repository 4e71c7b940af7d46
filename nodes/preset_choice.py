"""Trident Segment's preset dropdown: the presets, and where ComfyUI has DynamicCombo (0.4.0 on) 'custom', which shows
the parameters the benchmark presets differ in, only while it is chosen."""

from __future__ import annotations

from ..trident_core.config import MIN_STRIDE, Params
from ..trident_core.presets import PRESETS, Preset
from . import sockets as T
from .comfy_bridge import io

CUSTOM = "custom"
BASE = next(iter(PRESETS))  # 'default': what 'custom' starts from (its class list is the one typed)
DYNAMIC = hasattr(io, "DynamicCombo")
PRESET_CHOICES = (*PRESETS, CUSTOM) if DYNAMIC else tuple(PRESETS)
_P = PRESETS[BASE].params
TIP = ("Parameters: 'default' for everyday images, or a benchmark's configuration (voc21, context60, coco_object, "
       "... as in the paper).")


def _custom_inputs() -> list:
    """The parameters the benchmark presets set (docs/method.md's table), at the default preset's values."""
    w, c, r = _P.windows, _P.classification, _P.refinement
    return [
        T.short_side_input("The image's short side is scaled to this many pixels first (448; 336-688 in the "
                           "benchmark presets)."),
        io.Int.Input("stride", default=w.stride, min=MIN_STRIDE, max=1024, step=16,
                     tooltip="Step between the 336-pixel windows in pixels (224; 112 gives more overlap)."),
        *T.aggregation_inputs("Affinity threshold factor: a token pair counts when its value cosine exceeds "
                              "cos_fac x the row's mean cosine (1.2; 3.0 for Cityscapes).",
                              "Keep a negative threshold as it is (on) or raise it to 0.6 (off, as the Cityscapes "
                              "and ADE20K presets do)."),
        io.Float.Input("prob_thd", default=c.prob_thd, min=0.0, max=1.0, step=0.01,
                       tooltip="Pixels whose best class probability is below this get the background class, or no "
                               "label when there is none (0 = off)."),
        io.Float.Input("coarse_thresh", default=r.coarse_thresh, min=0.0, max=1.0, step=0.01,
                       tooltip="SAM refinement: classes and pixels below this probability are not prompted."),
    ]


def preset_input() -> object:
    """The dropdown: a DynamicCombo with 'custom' where ComfyUI has one, else the plain list of presets."""
    if not DYNAMIC:
        return io.Combo.Input("preset", options=list(PRESETS), default=BASE, tooltip=TIP)
    options = [io.DynamicCombo.Option(name, []) for name in PRESETS]
    options.append(io.DynamicCombo.Option(CUSTOM, _custom_inputs()))
    return io.DynamicCombo.Input("preset", options=options,
                                 tooltip=TIP + " custom: the default's, with the parameters shown below it.")


def preset_name(value: str | dict | None) -> str | None:
    """The chosen name: the value itself, or ComfyUI's DynamicCombo value {"preset": name, ...}."""
    return value.get("preset") if isinstance(value, dict) else value


def class_preset(name: str) -> Preset:
    """The preset whose class-list rules apply ('custom' types its classes, as 'default' does)."""
    return PRESETS[BASE if name == CUSTOM else name]


def preset_params(value: str | dict) -> Params:
    """The parameters of the chosen preset; for 'custom' the default's with the values shown under it."""
    name = preset_name(value)
    if name != CUSTOM:
        return PRESETS[name].params
    return _P.update(**{k: v for k, v in value.items() if k != "preset"})
