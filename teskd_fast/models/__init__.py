"""TESKD networks: the reference's (``faithful``), an exactly equivalent cheaper one (``fast``), any backbone,
compilation and export of the teacher for deployment."""

from .compile import compile_model
from .cost import COST_LIMIT, ModelCost, StudentCost, StudentCostWarning, cost
from .deploy import export_teacher
from .factory import create_model, wrap
from .fast import FastTESKDNet, patch_conv
from .resnet import ARCHS, build_resnet
from .teskd import TESKDNet

__all__ = [
    "ARCHS",
    "COST_LIMIT",
    "ModelCost",
    "StudentCost",
    "StudentCostWarning",
    "cost",
    "FastTESKDNet",
    "TESKDNet",
    "build_resnet",
    "compile_model",
    "create_model",
    "export_teacher",
    "patch_conv",
    "wrap",
]
