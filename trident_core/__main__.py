"""`python -m trident_core ...` and the `trident` command: its dependencies checked, then the command line."""

import sys
from importlib.util import find_spec


def main() -> None:
    """Run the command line; without OpenCV (an optional dependency) one line saying how to install it."""
    if find_spec("cv2") is None:
        print('error: Trident needs OpenCV: pip install "trident-seg[opencv]" (or an OpenCV you have already, e.g. '
              "opencv-python-headless)", file=sys.stderr)
        raise SystemExit(2)
    from .cli import run

    run()


if __name__ == "__main__":
    main()
