"""Trident: training-free open-vocabulary semantic segmentation with CLIP, DINO and SAM (arXiv 2411.09219).

Pure PyTorch; no ComfyUI import. `Trident.from_files(clip, dino, sam).segment(image, "sky, horse, grass")`."""

from .classes import UNLABELED, ClassList, ClassListError, parse_classes
from .classify import Segmentation
from .config import Params
from .pipeline import Trident
from .presets import PRESETS, get_preset

__all__ = ["PRESETS", "UNLABELED", "ClassList", "ClassListError", "Params", "Segmentation", "Trident", "get_preset",
           "parse_classes"]
__version__ = "0.1.0"
