"""Trident: training-free open-vocabulary semantic segmentation with CLIP, DINO and SAM (arXiv 2411.09219).

Pure PyTorch; no ComfyUI import. `Trident.from_files(clip, dino, sam).segment(image, "sky, horse, grass")`.
The names below are imported when first used, so the `trident` command can check its dependencies first."""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec

_EXPORTS = {"UNLABELED": "classes", "ClassList": "classes", "ClassListError": "classes", "parse_classes": "classes",
            "Segmentation": "classify", "Params": "config", "Trident": "pipeline", "PRESETS": "presets",
            "get_preset": "presets"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """The public names, each from its module on first use; a submodule (`trident_core.pipeline`) as an eager
    package would have it."""
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
