"""The reference's benchmark configurations (configs/cfg_*.py) and a `default` preset for everyday images."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from .classes import ClassList, check_several, load_class_file, name_key, parse_classes, read_class_file
from .config import Params


@dataclass(frozen=True)
class Preset:
    """A named bundle of stage configs; benchmark presets ship their dataset's class list (background first)."""

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
            return self._own_classes(background)
        if background and background.strip() or not self.background:
            return parse_classes(text, background or None)
        typed = parse_classes(text, several=False)
        taken = {name_key(n) for n in typed.queries}
        own = tuple(n for n in self.classes().classes[0] if name_key(n) not in taken)
        return ClassList((own, *typed.classes), True) if own else check_several(typed)

    def _own_classes(self, background: str | None) -> ClassList:
        """The preset's own list; with `background`, that is class 0 in place of the preset's own background."""
        own = self.classes()
        if not (background and background.strip()):
            return own
        foreground = own.classes[1:] if own.has_background else own.classes
        return parse_classes(["; ".join(names) for names in foreground], background)

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
