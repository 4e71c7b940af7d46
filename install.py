"""Run by ComfyUI-Manager and comfy-cli after requirements.txt (or by hand: `python install.py`): installs OpenCV
(opencv-python, the design's choice) only when no OpenCV distribution provides cv2 yet. opencv-python,
opencv-python-headless and opencv-contrib-python all install the same `cv2` files, so adding a second one to an
environment that has one leaves two distributions overwriting each other; requirements.txt therefore names none."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

OPENCV = "opencv-python>=4.8"


def main() -> int:
    if importlib.util.find_spec("cv2") is not None:
        print("ComfyUI-Trident: OpenCV (cv2) is already installed; keeping it")
        return 0
    print(f"ComfyUI-Trident: installing {OPENCV}")
    return subprocess.call([sys.executable, "-m", "pip", "install", OPENCV])


if __name__ == "__main__":
    sys.exit(main())
