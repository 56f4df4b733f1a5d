"""teskd_fast: fast, faithful TESKD (Teacher Evolution via Self-Knowledge Distillation).

The public surface is listed in ``__all__``. Submodules load on first use, so ``import teskd_fast``
works on a machine without a GPU, without Triton kernels compiled, and without DALI.
"""

import importlib

__version__ = "0.1.0"

__all__ = [
    "LossOptions",
    "TESKDLoss",
    "TESKDOutput",
    "teskd_loss",
    "create_model",
    "wrap",
    "export_teacher",
    "load_teacher",
    "compile_model",
    "cost",
    "data",
    "__version__",
]

_LAZY = {
    "TESKDLoss": "teskd_fast.loss",
    "teskd_loss": "teskd_fast.loss",
    "LossOptions": "teskd_fast.loss",
    "TESKDOutput": "teskd_fast.outputs",
    "create_model": "teskd_fast.models",
    "wrap": "teskd_fast.models",
    "export_teacher": "teskd_fast.models",
    "load_teacher": "teskd_fast.train.teacher_files",
    "compile_model": "teskd_fast.models",
    "cost": "teskd_fast.models",
}


def __getattr__(name):
    if name == "data":
        return importlib.import_module("teskd_fast.data")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'teskd_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
