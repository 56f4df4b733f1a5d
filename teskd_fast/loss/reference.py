"""The plain-PyTorch TESKD loss: the oracle of the tests, the baseline of the benchmarks (``backend="reference"``).

A direct composition of PyTorch functions, gradients by autograd, written to read like the method's definition
(docs/method.md, "Loss"). Half-precision logits are upcast to float32 first, as the reference implementation's
softmaxes ran in float32 under fp16 autocast; inputs of mixed floating dtypes (as autocast makes them) are all
computed in :func:`accumulation_dtype`.
"""

import torch
import torch.nn.functional as F

from .options import LossOptions


def accumulation_dtype(*tensors) -> torch.dtype:
    """The dtype the loss computes in, whatever the inputs' mix: float64 where any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def teskd_loss_reference(
    teacher_logits, student_logits, target, teacher_feature, student_features, head_weights, options: LossOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TESKD loss by composition. Inputs are already validated by :func:`teskd_fast.teskd_loss`.

    Args:
        teacher_logits: ``[B, C]``.
        student_logits: K ``[B, C]`` tensors.
        target: ``[B]`` int64.
        teacher_feature: ``[B, D]`` or None.
        student_features: K ``[B, D]`` tensors, or None.
        head_weights: K + 1 floats, teacher first.
        options: :class:`~teskd_fast.loss.options.LossOptions`.

    Returns:
        (total, ce, kd, feat) as scalar tensors; ce, kd, feat unweighted by alpha, beta, gamma.
    """
    features = () if teacher_feature is None else (teacher_feature, *student_features)
    acc = accumulation_dtype(teacher_logits, *student_logits, *features)
    T = options.temperature
    heads = [teacher_logits, *student_logits]
    ce = sum(
        w * F.cross_entropy(z.to(acc), target, ignore_index=options.ignore_index,
                            label_smoothing=options.label_smoothing)
        for w, z in zip(head_weights, heads, strict=True)
    )  # fmt: skip

    teacher = teacher_logits.detach() if options.detach_teacher else teacher_logits
    p = F.softmax(teacher.to(acc) / T, dim=1) + options.kd_eps
    batch = teacher_logits.shape[0]
    kd = sum(T * T * (p * (p.log() - F.log_softmax(z.to(acc) / T, dim=1))).sum() / batch for z in student_logits)

    if teacher_feature is None:
        feat = ce.new_zeros(())
    else:
        f_t = teacher_feature.detach().to(acc)
        feat = sum(((f.to(acc) - f_t).pow(2) * ((f.to(acc) > 0) | (f_t > 0))).sum() for f in student_features)
    total = options.ce_weight * ce + options.kd_weight * kd + options.feat_weight * feat
    return total, ce, kd, feat
