"""ComfyUI-Trident: training-free open-vocabulary segmentation (CLIP + DINO + SAM) as ComfyUI nodes.

ComfyUI imports this folder as a package named by its path; the nodes and the bundled `trident_core` library are
imported relatively, so no other copy of the library on sys.path is picked up. The nodes are V3 nodes, registered
through `comfy_entrypoint` only (ComfyUI ignores it where a NODE_CLASS_MAPPINGS is exported)."""

import logging

if __package__:  # (pytest may import this file on its own, from a folder whose name is no identifier: nothing to do)
    try:
        import cv2  # noqa: F401
    except ImportError as e:  # requirements.txt names no OpenCV: install.py adds one where none is present
        raise ImportError("ComfyUI-Trident needs OpenCV (cv2): run `python install.py` in the ComfyUI-Trident folder "
                          "with ComfyUI's Python (it installs opencv-python), or pip install opencv-python") from e

    from .nodes.comfy_bridge import MIN_COMFYUI, comfyui_without_v3

    if comfyui_without_v3():
        logging.error("ComfyUI-Trident needs ComfyUI %s or newer (its V3 node API, comfy_api.latest, is missing "
                      "here): update ComfyUI; no Trident node is loaded", MIN_COMFYUI)
        NODE_CLASS_MAPPINGS: dict = {}  # an old ComfyUI lists the pack as loaded with no node, after the line above
        __all__ = ["NODE_CLASS_MAPPINGS"]
    else:
        from .nodes import comfy_entrypoint  # noqa: F401

        __all__ = ["comfy_entrypoint"]
