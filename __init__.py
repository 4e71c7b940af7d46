"""ComfyUI-Trident: training-free open-vocabulary segmentation (CLIP + DINO + SAM) as ComfyUI nodes.

ComfyUI imports this folder as a package named by its path; the nodes and the bundled `trident_core` library are
imported relatively, so no other copy of the library on sys.path is picked up."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
