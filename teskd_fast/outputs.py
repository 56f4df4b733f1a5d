"""The output contract shared by TESKD networks and the TESKD loss."""

from collections.abc import Sequence
from typing import NamedTuple, Union

import torch

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]  # noqa: UP007 (a runtime alias, kept for Python 3.10)


class TESKDOutput(NamedTuple):
    """What a TESKD network returns, and what ``TESKDLoss`` consumes.

    A NamedTuple, so that it passes through ``torch.compile``, DDP and ``torch.jit`` untouched.

    Attributes:
        logits: teacher logits ``[B, C]``: the deployed network's output.
        student_logits: the K students' logits, deepest first: a sequence of ``[B, C]`` tensors or
            one ``[K, B, C]`` tensor.
        feature: teacher feature ``[B, D]`` (or ``[B, D, 1, 1]``), or None.
        student_features: the K students' features (a sequence of ``[B, D]`` or one ``[K, B, D]``),
            or None.
    """

    logits: torch.Tensor
    student_logits: Tensors
    feature: torch.Tensor | None = None
    student_features: Tensors | None = None
