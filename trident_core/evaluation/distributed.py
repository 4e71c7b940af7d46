"""torch.distributed set-up for ``torchrun`` evaluation: one process per GPU (NCCL) or per CPU worker (gloo)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise the process group from torchrun's env vars; returns (rank, world_size, device).

    Outside torchrun (no ``RANK``/``WORLD_SIZE`` in the environment) nothing is initialised and
    ``(0, 1, cuda:0 or cpu)`` is returned. Backend: NCCL when CUDA is available, else gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), _local_device()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, _local_device()
    if not dist.is_available():
        raise RuntimeError("launched by torchrun but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), _local_device()


def _local_device() -> torch.device:
    """This process's device: its LOCAL_RANK GPU under torchrun, cuda:0 alone, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(array: np.ndarray, op: str = "sum") -> np.ndarray:
    """Element-wise ``op`` ("sum" or "max") of ``array`` over all ranks (a copy when not distributed); dtype kept."""
    if not (dist.is_available() and dist.is_initialized()):
        return array.copy()
    tensor = torch.tensor(array)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.cpu().numpy()
