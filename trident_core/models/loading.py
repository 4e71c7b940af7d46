"""What the three loaders share: building a model on the meta device, assigning the file's tensors strictly, and
placing it for inference with the kernels applied."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from .. import kernels
from ..checkpoints import CheckpointError


def model_identity(arch: str, path: str | os.PathLike) -> str:
    """Which model made a stage's result: its architecture and file, links resolved (another model's results of the
    same shape mean nothing to this one)."""
    return f"{arch} from {os.path.realpath(path)}"


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike, what: str) -> None:
    """load_state_dict(strict=True) with an error that says which file does not fit which model."""
    try:
        module.load_state_dict(sd, strict=True, assign=True)  # the file's tensors become the weights: no copy
    except RuntimeError as e:
        first = str(e).split("\n\t")[:3]
        raise CheckpointError(f"{path}: does not fit {what}: {' '.join(first)[:600]}") from e


def finite(t: torch.Tensor, model: str, path: str | os.PathLike) -> torch.Tensor:
    """`t`, a model's output, once it holds no NaN or Inf: else one line naming the file (damaged weights gave
    all-NaN probabilities and exit 0). Checked on outputs, not at load: reading every weight to check it made the
    whole memory-mapped files resident (peak memory +1.2 GB, the text tower's weights included)."""
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{model} {path} gave NaN/Inf values: the file is damaged (delete it and download it "
                              "again), or half precision overflowed (load it in fp32)")
    return t


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model's structure without allocating or initialising weights (the checkpoint's tensors are then
    assigned by `load_strict`); saves the time of random initialisation that the file overwrites anyway."""
    with torch.device("meta"):
        return build()


def check_materialised(module: nn.Module, path: str | os.PathLike) -> None:
    """Every parameter and buffer came from the file or was rebuilt (none left on the meta device)."""
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: the checkpoint lacks tensors the model needs: {', '.join(left[:5])}")


def count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """The number of numbered blocks `prefix<i>.` in a state dict: a ValueError (`checkpoints.complete` makes it one
    line naming the file) unless they are numbered 0..n-1 (a block named 'blocks.x' was int()'s message; one named
    'blocks.100000' built 100001 blocks, minutes and a MemoryError)."""
    names = {k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)}
    numbers = {int(n) for n in names if n.isascii() and n.isdecimal()}
    if len(numbers) != len(names) or numbers != set(range(len(names))):
        found = sorted(names, key=lambda n: (0, int(n), n) if n.isascii() and n.isdecimal() else (1, 0, n))
        shown = found if len(found) <= 6 else [*found[:3], "...", *found[-3:]]
        raise ValueError(f"the blocks '{prefix}<i>' are not numbered 0 to {len(names) - 1} (found {', '.join(shown)})")
    return len(names)


def refuse_non_finite(sd: dict[str, torch.Tensor], keys: list[str], path: str | os.PathLike) -> None:
    """One line naming the file when one of these few small tensors holds NaN or Inf: for the weights a model reads
    outside the outputs `finite` checks (the large ones are checked through those outputs, not here)."""
    for key in keys:
        t = sd[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: the tensor {key!r} holds NaN/Inf values: the file is damaged; delete it "
                                  "and download it again")


def place(module: nn.Module, device: torch.device | str) -> nn.Module:
    """The model (its tensors in the dtypes `conversion.converted` gave them) in inference mode on `device`, with the
    kernels' tricks applied (kernels.apply)."""
    module = module.to(device=device).eval()
    module.requires_grad_(False)
    kernels.apply(module)
    return module
