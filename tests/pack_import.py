"""The pack imported as ComfyUI imports it, and its own trident_core's modules (for the node tests and the GPU
check, which run the nodes' code path with ComfyUI absent)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]


def import_pack() -> types.ModuleType:
    """The pack as ComfyUI imports it: spec from its __init__.py under a module name that is its full path."""
    name = str(PACK).replace(".", "_x_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def core(module: str) -> types.ModuleType:
    """A module of the pack's own trident_core (the nodes import it relatively, so its classes are not those of an
    installed trident_core)."""
    return importlib.import_module(f"{import_pack().__name__}.trident_core.{module}")
