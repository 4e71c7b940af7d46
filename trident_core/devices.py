"""Device and precision choice, the way ComfyUI picks them: CUDA, then MPS, then CPU; bfloat16 on a CPU only where
it computes bfloat16 natively."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
CPU_BF16_ENV = "TRIDENT_CPU_BF16"  # "1" / "0": this CPU does / does not compute bfloat16 natively (overrides detection)
# What bf16 on a native CPU trades (measured: docs/performance-bf16.md); the CLI's help and the loaders' tooltips.
CPU_BF16_TRADE = ("measured 1.4x to 2.1x faster per image (by CPU and host load), not exact: labels equal to "
                  "fp32's on 99.5 to 100 % of pixels (about 98 % after SAM refinement: a mask passes or fails its "
                  "thresholds whole), probabilities within 0.01; with cos_fac 2 or more "
                  "(city_scapes) SAM must stay fp32 for that (the command line keeps it so)")
# CPU features that multiply bfloat16 in hardware: x86 AVX512-BF16 and AMX-BF16, Arm's BF16 (and SVE's) extension.
BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")

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
    if isinstance(device, str):
        device = device.strip().lower()
    if device is None or device == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not one: use auto, cpu, cuda, cuda:N (the N-th GPU) or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: Trident runs on cpu, cuda or mps (or auto, which chooses)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use device cpu (--device cpu "
                         "on the command line)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was asked for but MPS is not available; use device cpu (--device cpu "
                         "on the command line)")
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


def _cpuinfo_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as the operating system lists them: Linux's /proc/cpuinfo ("flags" on x86, "Features"
    on Arm), macOS's sysctl hw.optional.arm.FEAT_BF16 (Apple M2 and newer); empty where neither answers."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return set()
        return {"bf16"} if out.strip() == "1" else set()
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            return {flag for line in f if line.split(":", 1)[0].strip() in ("flags", "Features")
                    for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def _torch_capabilities() -> Mapping[str, object]:
    """What PyTorch reports about the CPU (torch.cpu.get_capabilities, from PyTorch 2.8 on; {} before)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        return get() if get is not None else {}
    except RuntimeError:
        return {}


def bf16_native(capabilities: Mapping[str, object], cpu_flags: set[str], onednn: bool) -> str | None:
    """None where PyTorch multiplies bfloat16 natively on a CPU with these capabilities (PyTorch's report), feature
    flags (the operating system's) and oneDNN (PyTorch's bfloat16 kernel on the CPU); else why not."""
    if not any(capabilities.get(f) for f in BF16_FEATURES) and not cpu_flags.intersection(BF16_FEATURES):
        return ("this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX-BF16 on x86, BF16 on Arm), so bf16 "
                "would run slower than fp32 here")
    if not onednn:
        return ("this PyTorch has no oneDNN, its bfloat16 kernel on the CPU, so bf16 would run slower than fp32 "
                "here")
    return None


@functools.cache
def _host_bf16() -> str | None:
    return bf16_native(_torch_capabilities(), _cpuinfo_features(), torch.backends.mkldnn.is_available())


def cpu_bf16_refusal() -> str | None:
    """None where this CPU computes bfloat16 natively (detected once; TRIDENT_CPU_BF16=1 or 0 overrides the
    detection), else why bf16 is refused on it."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced == "1":
        return None
    if forced == "0":
        return f"{CPU_BF16_ENV}=0 says this CPU does not compute bfloat16 natively"
    if forced:
        return f"{CPU_BF16_ENV}={forced!r} is neither 1 nor 0 (set 1 to allow bf16, 0 to refuse it, or unset it)"
    return _host_bf16()


def resolve_dtype(precision: str, device: torch.device, auto: torch.dtype | None = None) -> torch.dtype:
    """Model weights' dtype. "auto": fp32 on the CPU (exact); elsewhere `auto` when given (ComfyUI's own choice for
    the device), else fp16 where it is fast (`fast_fp16`) and fp32 where it is not. On the CPU, bf16 only where it
    computes bfloat16 natively (`cpu_bf16_refusal`) and never fp16 (slow and inexact there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        if device.type == "cpu":
            return torch.float32
        return auto or (torch.float16 if fast_fp16(device) else torch.float32)
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("precision fp16 needs a GPU (on the CPU it is slow and inexact); use fp32 on the CPU, or "
                         "bf16 where the CPU computes bfloat16 natively")
    if device.type == "cpu" and precision == "bf16":
        why = cpu_bf16_refusal()
        if why is not None:
            raise ValueError(f"precision bf16 on the CPU: {why}; use fp32 (or auto). If this CPU does compute "
                             f"bfloat16 natively ({platform.processor() or platform.machine()}), set "
                             f"{CPU_BF16_ENV}=1")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


MAX_FRAMES_PER_FORWARD = 8  # enough to keep a GPU busy between kernel launches; the peak grows with it
FRAME_BYTES = 384 << 20  # a SAM tile's share of a shared forward on a GPU (SAM's encoder at 1024x1024 and the
# encoding a frame holds until it is segmented, its windows), with room to spare: what free memory is divided by


def frames_per_forward(device: torch.device, free_bytes: int | None = None, tiles: int = 1) -> int:
    """How many frames share a forward (`Trident.segment_frames`): 1 on the CPU and MPS (their kernels gain
    nothing from it, and the CPU stays bit for bit the reference's); on CUDA as many as the free memory
    (`free_bytes`; default CUDA's free memory and what PyTorch's allocator holds unused) holds at FRAME_BYTES per
    SAM tile of a frame, at most MAX_FRAMES_PER_FORWARD."""
    if device.type != "cuda":
        return 1
    if free_bytes is None:
        free_bytes = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                      - torch.cuda.memory_allocated(device))
    return max(1, min(MAX_FRAMES_PER_FORWARD, free_bytes // (FRAME_BYTES * max(1, tiles))))
