"""precision auto outside ComfyUI: fp16 only where the GPU computes it fast, by ComfyUI's rule (compute
capability and the cards it lists), never on the CPU (where auto is fp32)."""

from __future__ import annotations

import types

import pytest
import torch

from trident_core.devices import resolve_dtype


@pytest.mark.parametrize("major,name,want", [
    (9, "NVIDIA H200", torch.float16), (8, "NVIDIA GeForce RTX 3090", torch.float16),
    (7, "Tesla V100-SXM2-16GB", torch.float16), (7, "NVIDIA GeForce GTX 1660 SUPER", torch.float32),
    (7, "Tesla T1000", torch.float32), (6, "Tesla P100-PCIE-16GB", torch.float32),
    (6, "NVIDIA GeForce GTX 1080", torch.float32), (5, "GeForce GTX 980", torch.float32)])
def test_auto_chooses_fp16_by_compute_capability(monkeypatch, major, name, want):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        major=major, minor=0, name=name))
    assert resolve_dtype("auto", torch.device("cuda", 0)) == want


def test_auto_elsewhere_and_explicit_choices():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), torch.float16) == torch.float32  # ComfyUI never says so
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_dtype("fp16", torch.device("cpu"))  # bf16 on the CPU: tests/test_cpu_bf16.py
