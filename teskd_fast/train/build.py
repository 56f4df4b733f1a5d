"""Builders of a training run from its config: the data check, the loaders, the model, the loss, the optimiser.

Each is a function of the config (and of the process's place in the job): the :class:`~teskd_fast.train.trainer.
Trainer` calls them and holds what they return. What a dataset looks like is the data package's business;
:func:`check_dataset` only asks it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from teskd_fast.train import distributed as D
from teskd_fast.train.config import TrainConfig
from teskd_fast.train.schedule import image_size_at


def data_root(cfg: TrainConfig) -> Path:
    """The ``--data-dir`` folder (default ``data``)."""
    return Path(cfg.data_dir or "data").expanduser()


def check_dataset(cfg: TrainConfig) -> None:
    """Fail before any work when the dataset is not there (:class:`teskd_fast.data.DatasetNotFoundError`).

    The message comes from the data package: where it looked and how to get the dataset.
    """
    from teskd_fast.data import check_dataset as check

    check(cfg.dataset, data_root(cfg), download=cfg.download)


def build_data(cfg: TrainConfig, env: D.DistEnv, channels_last: bool) -> tuple[Any, Any, int]:
    """Training and validation loaders for this process's shard, and the number of classes.

    Returns:
        ``(train, val, num_classes)``; each loader has ``len()``, yields ``(images, labels)`` on the device.
    """
    per_rank = cfg.batch_size // env.world_size
    if cfg.dataset == "digits":
        from teskd_fast.data.digits import NUM_CLASSES, digits_loaders

        train, val = digits_loaders(batch_size=per_rank, device=env.device, seed=cfg.seed, rank=env.rank,
                                    world_size=env.world_size, image_size=cfg.image_size,
                                    channels_last=channels_last)
        return train, val, NUM_CLASSES
    if cfg.dataset in ("cifar10", "cifar100"):
        from teskd_fast.data import cifar_loaders

        train, val = cifar_loaders(
            str(data_root(cfg)), dataset=cfg.dataset, batch_size=per_rank, device=env.device, seed=cfg.seed,
            download=cfg.download, rank=env.rank, world_size=env.world_size, channels_last=channels_last,
        )
        return train, val, len(train.classes)
    from teskd_fast.data import imagenet_loaders

    train, val = imagenet_loaders(
        str(data_root(cfg)), batch_size=per_rank, backend=None if cfg.loader == "auto" else cfg.loader,
        image_size=image_size_at(cfg, 0), val_resize=cfg.val_resize, val_image_size=cfg.val_image_size,
        device=env.device, rank=env.rank, world_size=env.world_size, workers=cfg.workers, seed=cfg.seed,
        channels_last=channels_last,
    )
    return train, val, len(train.classes)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The network, initialised from ``cfg.seed``: the TESKD model, or for ``baseline`` its teacher alone.

    The baseline is the TESKD model's exported teacher, so that the two methods start from identical teacher
    weights (the same seed, the same construction) and differ only in the students and the loss.
    """
    import teskd_fast

    torch.manual_seed(cfg.seed)
    model = teskd_fast.create_model(cfg.arch, num_classes, stem=cfg.stem, formulation=cfg.formulation,
                                    width=cfg.width)
    if cfg.method == "baseline":
        from teskd_fast.models.teskd import check_resnet_input

        model = teskd_fast.export_teacher(model)
        # The teacher alone checks its input as the TESKD network does (a clear error, not one from inside conv2d).
        model.register_forward_pre_hook(check_resnet_input)
    return model


def build_criterion(cfg: TrainConfig, world_size: int) -> Callable:
    """``criterion(output, target) -> (loss, parts)``.

    The feature term is a sum over the batch, not a mean; DDP averages gradients over processes, so its
    weight is multiplied by ``world_size`` to keep the global-batch loss of one process.
    """
    if cfg.method == "baseline":
        def ce(logits, target):
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
            return loss, {"ce": loss.detach()}
        return ce
    from teskd_fast import TESKDLoss

    return TESKDLoss(temperature=cfg.temperature, ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight,
                     feat_weight=cfg.feat_weight * world_size, label_smoothing=cfg.label_smoothing,
                     backend="auto", return_parts=True)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One group with weight decay; with ``bn_weight_decay=False`` BatchNorm weights and biases go without."""
    if cfg.bn_weight_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase)
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum over :func:`param_groups`."""
    return torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)
