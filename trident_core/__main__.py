"""`python -m trident_core ...` and the `trident` command: its dependencies checked, then the command line."""

import os
import sys
from importlib.util import find_spec


def main() -> None:
    """Run the command line; without OpenCV (an optional dependency) one line saying how to install it."""
    if find_spec("cv2") is None:
        print('error: Trident needs OpenCV: pip install "trident-seg[opencv]" (or an OpenCV you have already, e.g. '
              "opencv-python-headless)", file=sys.stderr)
        raise SystemExit(2)
    # MKL keeps the work buffers of float32 products for reuse (20 to 60 MB at SAM's encoder, more where its first
    # product comes late, as in bf16 mode) unless told before torch loads it; no measurable time either way
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    from .cli import run

    run()


if __name__ == "__main__":
    main()
