"""Device and precision choice, the way ComfyUI picks them: CUDA, then MPS, then CPU."""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def default_device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto" picks the default device; anything else is checked to exist."""
    if device is None or device == "auto":
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was asked for but MPS is not available; use --device cpu")
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Model weights' dtype: fp32 on CPU, fp16 on CUDA/MPS when "auto"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if precision != "fp32" and device.type == "cpu":
        raise ValueError(f"precision {precision} needs a GPU; use fp32 on CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
