"""Read the tensors of a TorchScript archive (OpenAI's CLIP ViT-B-16.pt) without running anything from it.

`torch.jit.load` compiles the archive's `code/` and runs it (a class's `__setstate__` can write any file), so it is
never called. The archive's `data.pkl` is unpickled with an unpickler that builds only tensors, ordered dicts and
inert placeholders for the scripted modules; each module's parameter and buffer names are read as text from the
`__parameters__ = [...]` / `__buffers__ = [...]` lines of its class in `code/`. The result has the keys and values
`torch.jit.load(path).state_dict()` would give.
"""

from __future__ import annotations

import ast
import collections
import pickle
import re
import zipfile
from pathlib import PurePosixPath

import torch

_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
MAX_CODE_BYTES = 16 << 20  # a scripted class's source (OpenAI's CLIP: a few KB per file)
_CLASS = re.compile(r"^class (\w+)\(Module\):\n((?:[ \t]+.*\n|\n)*)", re.MULTILINE)
_LIST = re.compile(r"^  __(parameters|buffers)__ = (\[.*\])$", re.MULTILINE)


class _Module:
    """Inert stand-in for a scripted module: it only keeps the class name and the attributes it was pickled with."""

    qualname = ""

    def __setstate__(self, state: object) -> None:
        self.state = state


class _Storage:
    """The storage class named in a persistent id: only its element type is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_unused: object) -> torch.Tensor:
    """`torch._utils._rebuild_tensor_v2` on a flat tensor of the storage's elements (no grad, no hooks)."""
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _Unpickler(pickle.Unpickler):
    """Builds tensors from the archive's `data/` records and placeholders for `__torch__` classes; refuses the rest."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str):
        super().__init__(zf.open(f"{prefix}data.pkl"))
        self._zf, self._prefix = zf, prefix
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}:
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _DTYPES:
            return _Storage(_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_Module,), {"qualname": f"{module}.{name}"})
        raise pickle.UnpicklingError(f"the archive's data.pkl refers to {module}.{name}, which a weights file "
                                     "never needs")

    def persistent_load(self, pid: object) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]} in the archive's data.pkl")
        _, kind, key, _location, numel = pid
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            size = self._zf.getinfo(name).file_size
            if size != numel * kind.dtype.itemsize:
                raise pickle.UnpicklingError(f"the archive's record {name} holds {size} bytes, not the "
                                             f"{numel} elements its tensor names")
            raw = bytearray(self._zf.read(name))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            self._storages[key] = flat.view(kind.dtype)[:numel] if kind.dtype != torch.uint8 else flat[:numel]
        return self._storages[key]


def _class_members(zf: zipfile.ZipFile, prefix: str, qualname: str) -> list[str] | None:
    """Parameter then buffer names of class `qualname`, read as text from its `code/` file (never compiled);
    None when the file does not list them."""
    module, _, name = qualname.rpartition(".")
    try:
        info = zf.getinfo(f"{prefix}code/{module.replace('.', '/')}.py")
    except KeyError:
        return None
    if info.file_size > MAX_CODE_BYTES:  # (compressed, as PyTorch writes code: read only what is plausible)
        raise pickle.UnpicklingError(f"the archive's {info.filename} holds {info.file_size} bytes of code, more "
                                     "than a model's class ever has")
    text = zf.read(info).decode("utf-8")
    for match in _CLASS.finditer(text):
        if match.group(1) == name:
            found = {kind: ast.literal_eval(names) for kind, names in _LIST.findall(match.group(2))}
            lists = found.get("parameters"), found.get("buffers")
            if all(isinstance(x, list) and all(isinstance(n, str) for n in x) for x in lists):
                return lists[0] + lists[1]  # type: ignore[operator]
    return None


def _collect(obj: _Module, path: str, zf: zipfile.ZipFile, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Add a module's parameters and buffers, then its submodules', as `state_dict()` orders them."""
    if not isinstance(obj.state, dict):
        raise pickle.UnpicklingError(f"module {obj.qualname} is pickled with custom state, not as attributes")
    members = _class_members(zf, prefix, obj.qualname)
    for name in obj.state if members is None else members:  # without the lists: every tensor attribute
        value = obj.state.get(name)
        if isinstance(value, torch.Tensor):
            out[path + name] = value
    for name, value in obj.state.items():
        if isinstance(value, _Module):
            _collect(value, f"{path}{name}.", zf, prefix, out)


def is_torchscript(zf: zipfile.ZipFile) -> bool:
    """A TorchScript archive holds `code/` and `constants.pkl` beside its `data.pkl`."""
    return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def read_torchscript_state_dict(zf: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, as `torch.jit.load(...).state_dict()` names them.

    Raises pickle.UnpicklingError for anything but plain modules holding tensors."""
    packed = next((i.filename for i in zf.infolist() if i.compress_type != zipfile.ZIP_STORED
                   and ("/data/" in i.filename or i.filename.endswith("data.pkl"))), None)
    if packed is not None:  # (PyTorch stores its tensors and pickle as they are: a compressed one may unpack to
        raise pickle.UnpicklingError(  # any size)
            f"the archive's record {packed} is compressed, which PyTorch never writes")
    pickles = [n for n in zf.namelist() if PurePosixPath(n).name == "data.pkl" and n.count("/") == 1]
    if len(pickles) != 1:
        raise pickle.UnpicklingError("the archive has no single <name>/data.pkl")
    prefix = pickles[0][: -len("data.pkl")]
    root = _Unpickler(zf, prefix).load()
    if not isinstance(root, _Module):
        raise pickle.UnpicklingError(f"the archive holds a {type(root).__name__}, not a scripted module")
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", zf, prefix, out)
    return out
