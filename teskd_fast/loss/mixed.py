"""The TESKD loss on mixed targets (CutMix, MixUp): ``lam * CE(y_a) + (1 - lam) * CE(y_b)`` for every head.

One call of any backend, then an exact correction. For one head with logits ``z``, PyTorch's label-smoothed
cross-entropy of a class ``y`` is ``CE(y) = (1 - eps) * (lse(z) - z_y) + eps * (lse(z) - mean(z))``, linear in
``z_y``; so, sample by sample,

    lam * CE(y_a) + (1 - lam) * CE(y_b) = CE(y_a) + (1 - eps) * (1 - lam) * (z_{y_a} - z_{y_b}),

and over the batch mean and the K + 1 weighted heads the correction is
``(1 - eps) * (1 - lam) * sum_k w_k * mean_i(z_k[i, y_a] - z_k[i, y_b])``: two gathers per head, whose gradient
autograd adds to the backend's. The backend computes the KD and feature terms once, on the mixed images, as the
method defines them; calling the whole loss twice (once per target) would double them. The mixed images have
class targets only: ``ignore_index`` is not a valid target here.
"""

import torch

from .api import TESKDLoss, _heads, teskd_loss
from .options import LossOptions
from .reference import accumulation_dtype


def mixed_ce_correction(heads, target_a, target_b, lam, *, head_weights=None, label_smoothing=0.0) -> torch.Tensor:
    """``sum_k w_k * (lam * CE_k(y_a) + (1 - lam) * CE_k(y_b) - CE_k(y_a))``, exactly (see the module docstring).

    Args:
        heads: the K + 1 ``[B, C]`` logits, teacher first (any of the loss's dtypes).
        target_a, target_b: ``[B]`` class indices in ``[0, C)``: the pasted-onto and the pasted images' labels.
        lam: the weight of ``target_a`` in ``[0, 1]`` (a Python number: no device synchronisation).
        head_weights: K + 1 weights, teacher first; default all 1.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.

    Returns:
        a scalar, float32 (float64 for float64 logits), with gradients into every head.
    """
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: the weight of target_a must lie in [0, 1], got {lam}")
    heads = list(heads)
    weights = (1.0,) * len(heads) if head_weights is None else tuple(float(w) for w in head_weights)
    if len(weights) != len(heads):
        raise ValueError(f"head_weights: {len(weights)} weights for {len(heads)} heads")
    B, C = heads[0].shape
    for name, t in (("target_a", target_a), ("target_b", target_b)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.shape != (B,):
            raise ValueError(f"{name}: expected [B] = [{B}] integer class indices, got {t!r:.60}")
        if t.device.type == "cpu" and t.numel() and not (0 <= int(t.min()) and int(t.max()) < C):
            raise ValueError(f"{name}: class indices must lie in [0, {C}) (ignore_index is not a mixed target), "
                             f"got values in [{int(t.min())}, {int(t.max())}]")
    acc = accumulation_dtype(*heads)
    index = torch.stack([target_a.long(), target_b.long()], 1)
    diff = 0.0
    for w, z in zip(weights, heads, strict=True):
        picked = z.to(acc).gather(1, index)
        diff = diff + w * (picked[:, 0] - picked[:, 1]).mean()
    return (1.0 - float(label_smoothing)) * (1.0 - lam) * diff


def teskd_loss_mixed(teacher_logits, student_logits, target_a, target_b, lam, teacher_feature=None,
                     student_features=None, **options):
    """:func:`teskd_fast.teskd_loss` with every head's CE on the mixed targets ``lam * y_a + (1 - lam) * y_b``.

    Args: those of :func:`teskd_fast.teskd_loss` (``backend`` and every option included), with ``target``
    replaced by ``target_a``, ``target_b`` (``[B]`` class indices) and ``lam`` (a number in ``[0, 1]``).

    Returns:
        as :func:`teskd_fast.teskd_loss`: the total, and with ``return_parts`` the parts, ``"ce"`` the mixed CE.
    """
    return_parts = options.pop("return_parts", False)
    total, parts = teskd_loss(teacher_logits, student_logits, target_a, teacher_feature, student_features,
                              return_parts=True, **options)
    heads = [teacher_logits, *_heads("student_logits", student_logits, 2).tensors]
    correction = mixed_ce_correction(heads, target_a, target_b, lam, head_weights=options.get("head_weights"),
                                     label_smoothing=options.get("label_smoothing", 0.0))
    total = total + options.get("ce_weight", LossOptions._field_defaults["ce_weight"]) * correction
    parts = {**parts, "ce": parts["ce"] + correction.detach()}
    return (total, parts) if return_parts else total


def mixed_criterion(criterion: TESKDLoss, out, target_a, target_b, lam):
    """A :class:`TESKDLoss` module's ``criterion(out, target)`` on mixed targets (its options, once per call)."""
    return teskd_loss_mixed(out.logits, out.student_logits, target_a, target_b, lam, out.feature,
                            out.student_features, **criterion.options)
