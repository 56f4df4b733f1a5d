"""Reading the files users point at without ever running what they hold.

A pickle can name any Python callable and have the unpickler call it: loading a ``.pt`` file with
``torch.load(weights_only=False)`` or a CIFAR batch with ``pickle.load`` runs whatever the file says. Every file
teskd_fast reads goes through one of three readers here instead:

- :func:`load_torch`: ``torch.load(weights_only=True)``, PyTorch's restricted unpickler (tensors, containers,
  numbers, strings), with an allow-list of harmless types (:data:`TORCH_ALLOWED`: NumPy arrays and scalars, which
  checkpoints of teskd_fast 0.1 and of other trainers hold, and ``argparse.Namespace``, timm's ``args``);
- :func:`load_safetensors`: a ``.safetensors`` file (a header of JSON and raw tensor bytes: nothing to run);
- :func:`load_plain_pickle`: a pickle of plain data (dicts, lists, tuples, strings, bytes, numbers and NumPy
  arrays), the format of the CIFAR archives.

A file that needs anything else is refused with :class:`UnsafeFileError`, whose message names the file and the
type it would have had to build. Nothing falls back to the full unpickler.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import builtins
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

# NumPy's array, dtype and scalar reconstruction, under both module names (numpy 1.x wrote numpy.core, 2.x
# numpy._core): a pickled array is _reconstruct(ndarray, shape, dtype) and a __setstate__ with raw bytes, or (in
# protocol 5) _frombuffer(bytes, dtype, shape, order); a scalar is scalar(dtype, bytes). None of them calls
# anything a file names: an object array's items are unpickled as items, under the same rules.
_DTYPES = getattr(np, "dtypes", None)  # numpy >= 1.25: the dtype classes a dtype's pickle may name
_NUMPY = [np.ndarray, np.dtype, *(getattr(_DTYPES, n) for n in dir(_DTYPES) if n.endswith("DType")
                                  and n not in ("ObjectDType", "VoidDType", "StringDType"))]
_NUMPY_FUNCTIONS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


def _numpy_function(module: str, name: str):
    import importlib

    for candidate in (module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


# What torch.load may build beyond PyTorch's own weights-only set: NumPy arrays and scalars (the numpy RNG state of
# teskd_fast 0.1 checkpoints; metrics other trainers save), and argparse.Namespace (timm's train.py saves its
# arguments as one: a plain record of values, each unpickled under the same rules).
TORCH_ALLOWED: list[Any] = [
    *_NUMPY,
    *sorted({_numpy_function(m, n) for m, n in _NUMPY_FUNCTIONS}, key=lambda f: f.__name__),
    argparse.Namespace,
]


_TORCH_ADVICE = ("teskd_fast loads tensors and plain data only. If you trust the file, load it yourself with "
                 "torch.load(weights_only=False) and save its state_dict")
CIFAR_ADVICE = ("a CIFAR batch file holds only dicts, lists, strings, bytes, numbers and NumPy arrays: download the "
                "dataset again")


class UnsafeFileError(ValueError):
    """A file whose loading would run code (build an object of a type outside the allow-lists); the message names
    the file and that type."""

    def __init__(self, path: str | os.PathLike, what: str, advice: str = _TORCH_ADVICE):
        self.path, self.what = str(path), what
        super().__init__(f"{path}: refused: it holds {what}, which only the full unpickler builds (loading it could "
                         f"run code from the file); {advice}")


def _allowed_names() -> set[str]:
    from torch._weights_only_unpickler import _get_allowed_globals

    names = set(_get_allowed_globals())
    names.update(f"{obj.__module__}.{obj.__qualname__}" for obj in TORCH_ALLOWED)
    names.update(f"{m}.{n}" for m, n in _NUMPY_FUNCTIONS)
    names.update(f"{obj.__module__}.{obj.__qualname__}" for obj in torch.serialization.get_safe_globals()
                 if hasattr(obj, "__qualname__"))
    return names


def _globals_in(data: bytes) -> list[str]:
    """The ``module.name`` globals a pickle refers to, in order, read from its opcodes (nothing is built)."""
    found, strings, memo, pushed = [], [], {}, None
    try:
        for op, arg, _ in pickletools.genops(data):
            string = None
            if op.name == "GLOBAL":  # protocols 0-2: Python 2's module names where they differ (__builtin__)
                module, name = arg.split(" ", 1)
                module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
                found.append(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                string = arg
            elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed
                continue  # the value stays on the stack: still the one pushed last
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                string = memo.get(arg)
            if string is not None:
                strings.append(string)
            pushed = string
    except Exception:  # a damaged pickle: what was read so far
        pass
    return found


def _pickle_of(path: Path) -> bytes:
    """The pickled structure of a torch file: the data.pkl member of its zip archive, or the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            return archive.read(names[0]) if names else b""
    return path.read_bytes()


def _refused_global(path: Path, message: str) -> str | None:
    """The type torch.load's restricted unpickler refused in ``path``: the first global of the pickle outside the
    allow-lists (its full ``module.name``), else the one torch's message names."""
    try:
        allowed = _allowed_names()
        found = next((g for g in _globals_in(_pickle_of(path)) if g not in allowed), None)
    except Exception:
        found = None
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return found or (match.group(1) if match else None)


def _weights_only_reason(message: str) -> str:
    """The restricted unpickler's own reason, one line, from torch's long message."""
    match = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    return match.group(1).strip() if match else message.strip().splitlines()[0]


def load_torch(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` of ``path`` under the restricted unpickler and :data:`TORCH_ALLOWED`.

    Raises:
        UnsafeFileError: the file holds an object of another type (its loading could run code).
        Exception: whatever ``torch.load`` raises for a file that is not a torch file or is corrupt.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(TORCH_ALLOWED), warnings.catch_warnings():
            # A pickle protocol other than torch's own: still read under the same rules, nothing to warn about.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "weights_only" not in message and "WeightsUnpickler" not in message:
            raise
        refused = _refused_global(path, message)
        what = (refused if refused else
                f"something PyTorch's restricted unpickler does not build ({_weights_only_reason(message)})")
        raise UnsafeFileError(path, what) from None


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as a safetensors file."""
    return str(path).endswith(".safetensors")


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file, on the CPU.

    Raises:
        ValueError: not a readable safetensors file (the message says why).
    """
    try:
        from safetensors import safe_open
    except ImportError:
        raise ValueError(f"{path}: reading a .safetensors file needs the safetensors package (pip install "
                         "safetensors)") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # SafetensorError (a bad header), OSError, ...
        text = str(e).strip().splitlines()
        raise ValueError(f"{path}: not a readable safetensors file ({text[0] if text else type(e).__name__})") from None


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, bytes, numbers and NumPy arrays; refuses every other type."""

    def __init__(self, file, name: str, advice: str, **kwargs):
        super().__init__(file, **kwargs)
        self.name, self.advice = name, advice

    def find_class(self, module: str, name: str):
        # Python 2's names (__builtin__, copy_reg), as pickle maps them for protocols 0-2 (the CIFAR files).
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _NUMPY_FUNCTIONS:
            return _numpy_function(module, name)
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # bytes, as Python 3 writes them in protocols 0-2
            import codecs

            return codecs.encode
        if module == "builtins" and name in ("bytes", "bytearray"):  # NumPy pickles an empty array's data so
            return getattr(builtins, name)
        raise UnsafeFileError(self.name, f"{module}.{name}", self.advice)


def load_plain_pickle(file: io.BufferedIOBase, name: str, encoding: str = "ASCII", advice: str = "") -> Any:
    """Unpickle plain data from the open binary ``file`` (``name`` names it in messages, ``advice`` ends the one of
    a refusal).

    Raises:
        UnsafeFileError: the pickle refers to any type beyond plain data and NumPy arrays.
        pickle.UnpicklingError, EOFError, ValueError: not a pickle, or cut short.
    """
    return _PlainUnpickler(file, name, advice or "only plain data is read", encoding=encoding).load()
