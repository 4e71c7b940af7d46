"""The three models Trident runs, each behind one adapter that is the only place knowing its library: CLIP
(open_clip), DINO (timm) and SAM (segment_anything). Each loader reads an official checkpoint file, refuses a wrong
or corrupt one in one line, and applies the kernels (`trident_core.kernels`)."""

from .clip import ClipModel, load_clip
from .dino import DinoModel, load_dino
from .sam import SamEncoding, SamModel, load_sam

__all__ = ["ClipModel", "DinoModel", "SamEncoding", "SamModel", "load_clip", "load_dino", "load_sam"]
