"""The reference's benchmark configurations (configs/cfg_*.py) and a `default` preset for everyday images."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from importlib import resources

from .classes import ClassList, load_class_file, name_key, parse_classes, read_class_file


@dataclass(frozen=True)
class Params:
    """Every constant of the method; presets differ in a few of them."""

    short_side: int = 448
    long_cap: int = 2048
    window: int = 336
    stride: int = 224
    gamma: float = 3.0
    beta: float = 1.2
    cos_fac: float = 1.2
    refine_neg_cos: bool = True
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    correlation: str = "affinity"
    paradigm: str = "splice_then_segment"
    sam_tiles: str = "1x1"
    refine: bool = False
    coarse_thresh: float = 0.2
    minimal_area: int = 225
    mask_alpha: float = 0.005
    iou_thresh: float = 0.80
    mask_prompt_mode: str = "reference"
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)

    def __post_init__(self) -> None:
        """Refuse values that would give a meaningless result (a one-pixel image, gaps between windows, NaN)."""
        for name, (lo, hi, whole) in _RANGES.items():
            value = getattr(self, name)
            hi = self.window if name == "stride" else hi
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and lo <= value <= hi and (not whole or value == int(value)))
            if not ok:
                kind = "a whole number" if whole else "a number"
                why = " (the window): a larger stride leaves gaps between windows" if name == "stride" else ""
                raise ValueError(f"{name}={value!r} is out of range: expected {kind} from {lo:g} to {hi:g}{why}. "
                                 f"Give a value in that range (default {self.__dataclass_fields__[name].default}).")

    def update(self, **changes) -> Params:
        """A copy with some fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_RANGES: dict[str, tuple[float, float, bool]] = {  # name: (lowest, highest, whole numbers only)
    "short_side": (32, 8192, True), "long_cap": (32, 16384, True), "window": (32, 4096, True),
    "stride": (1, 4096, True), "gamma": (-1e6, 1e6, False), "beta": (-1e6, 1e6, False),
    "cos_fac": (-1e6, 1e6, False), "logit_scale": (1e-6, 1e6, False), "prob_thd": (0, 1, False),
    "coarse_thresh": (0, 1, False), "minimal_area": (0, 1 << 30, True), "mask_alpha": (0, 1e6, False),
    "iou_thresh": (0, 1, False),
}


@dataclass(frozen=True)
class Preset:
    """A named configuration; benchmark presets ship their dataset's class list (background first)."""

    name: str
    params: Params
    class_file: str | None = None
    background: bool = False
    description: str = ""

    def class_list(self, text: str, background: str | None = None) -> ClassList:
        """Typed classes (commas and line breaks separate classes), all foreground; or the preset's own list when
        `text` is empty. Class 0 is `background` when given, else the preset's background class (voc21,
        context60, coco_object) without the names typed as classes."""
        if not text.strip() and self.class_file:
            return self.classes()
        if background and background.strip() or not self.background:
            return parse_classes(text, background or None)
        typed = parse_classes(text)
        taken = {name_key(n) for n in typed.queries}
        own = tuple(n for n in self.classes().classes[0] if name_key(n) not in taken)
        return ClassList((own, *typed.classes), True) if own else typed

    def class_list_from_file(self, path: str, background: str | None = None) -> ClassList:
        """A class file's classes (one per line, commas part of a name). Line 0 is the background when the preset
        has one, as in the reference, unless `background` is given: then that is class 0 and every line a class."""
        if background and background.strip():
            return parse_classes(read_class_file(path), background)
        return load_class_file(path, self.background)

    def classes(self) -> ClassList:
        """The preset's own class list (benchmark presets only)."""
        if self.class_file is None:
            raise ValueError(f"preset {self.name!r} has no class list; give the class names")
        # this package by its own name: inside ComfyUI it is the pack's `<path>.trident_core`, not `trident_core`
        with resources.as_file(resources.files(__package__).joinpath("data", self.class_file)) as path:
            return load_class_file(str(path), self.background)


_P = Params()
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("default", _P, description="everyday images: short side 448, no class list"),
    Preset("voc21", _P.update(prob_thd=0.2, coarse_thresh=0.2), "cls_voc21.txt", True, "PASCAL VOC, 20 + background"),
    Preset("voc20", _P.update(short_side=336, stride=112, cos_fac=0.0, coarse_thresh=0.2), "cls_voc20.txt",
           description="PASCAL VOC, 20 classes"),
    Preset("context60", _P.update(short_side=576, prob_thd=0.15, coarse_thresh=0.15), "cls_context60.txt", True,
           "PASCAL Context, 59 + background"),
    Preset("context59", _P.update(short_side=576, coarse_thresh=0.15), "cls_context59.txt",
           description="PASCAL Context, 59 classes"),
    Preset("coco_object", _P.update(prob_thd=0.25, coarse_thresh=0.25), "cls_coco_object.txt", True,
           "COCO-Object, 80 + background"),
    Preset("coco_stuff", _P.update(coarse_thresh=0.05), "cls_coco_stuff.txt", description="COCO-Stuff, 171 classes"),
    Preset("city_scapes", _P.update(short_side=688, cos_fac=3.0, refine_neg_cos=False, coarse_thresh=0.10,
                                    sam_tiles="1x2"), "cls_city_scapes.txt", description="Cityscapes, 19 classes"),
    Preset("ade20k", _P.update(short_side=576, refine_neg_cos=False, coarse_thresh=0.05), "cls_ade20k.txt",
           description="ADE20K, 150 classes"),
    # cfg_ade847.py / cfg_context459.py set only the class file: the base configuration's parameters.
    Preset("ade847", _P, "cls_ade20k847.txt", description="ADE20K-Full, 847 classes"),
    Preset("context459", _P, "cls_context459.txt", description="PASCAL Context, 459 classes"),
)}


def get_preset(name: str) -> Preset:
    """A preset by name, with a helpful error listing the others."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
