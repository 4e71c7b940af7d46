"""ComfyUI-Trident: training-free open-vocabulary segmentation (CLIP + DINO + SAM) as ComfyUI nodes.

ComfyUI imports this folder as a package named by its path; the nodes and the bundled `trident_core` library are
imported relatively, so no other copy of the library on sys.path is picked up."""

try:
    import cv2  # noqa: F401
except ImportError as e:  # requirements.txt names no OpenCV distribution: install.py adds one where none is present
    raise ImportError("ComfyUI-Trident needs OpenCV (cv2): run `python install.py` in the ComfyUI-Trident folder "
                      "with ComfyUI's Python (it installs opencv-python), or pip install opencv-python") from e

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
