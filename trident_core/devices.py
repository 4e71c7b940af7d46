"""Device and precision choice, the way ComfyUI picks them: CUDA, then MPS, then CPU."""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")

# Turing parts on which float16 is broken or slow (ComfyUI's list in model_management.should_use_fp16).
_SLOW_FP16_CARDS = ("1660", "1650", "1630", "T500", "T550", "T600", "MX550", "MX450", "CMP 30HX", "T2000", "T1000",
                    "T1200")


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


def fast_fp16(device: torch.device) -> bool:
    """Whether float16 computes fast on `device`, by ComfyUI's rule: Apple MPS and ROCm yes; NVIDIA from Volta
    (compute capability 7) on, except the GeForce 16 series and its relatives; older cards and the CPU no."""
    if device.type == "mps":
        return True
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    props = torch.cuda.get_device_properties(device)
    if props.major >= 8:
        return True
    return props.major == 7 and not any(card in props.name for card in _SLOW_FP16_CARDS)


def resolve_dtype(precision: str, device: torch.device, auto: torch.dtype | None = None) -> torch.dtype:
    """Model weights' dtype. "auto": fp32 on the CPU; elsewhere `auto` when given (ComfyUI's own choice for the
    device), else fp16 where it is fast (`fast_fp16`) and fp32 where it is not."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        if device.type == "cpu":
            return torch.float32
        return auto or (torch.float16 if fast_fp16(device) else torch.float32)
    if precision != "fp32" and device.type == "cpu":
        raise ValueError(f"precision {precision} needs a GPU; use fp32 on CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
