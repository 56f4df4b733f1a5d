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

from teskd_fast.data.catalog import LoaderRequest, dataset_spec
from teskd_fast.data.imagenet import backend_problem
from teskd_fast.data.protocol import Loader
from teskd_fast.loss.options import BASELINE_PARTS
from teskd_fast.train import distributed as D
from teskd_fast.train.archs import timm_name
from teskd_fast.train.config import ConfigError, TrainConfig, loss_fields, student_levels
from teskd_fast.train.schedule import image_size_at


def data_root(cfg: TrainConfig) -> Path:
    """The ``--data-dir`` folder (default: the dataset's installed copy where it has one, e.g. Fashion-MNIST's
    /usr/share/datasets/fashion-mnist, else ``data``)."""
    default = None if cfg.data_dir else dataset_spec(cfg.dataset).default_root()
    return Path(cfg.data_dir or default or "data").expanduser()


def check_dataset(cfg: TrainConfig) -> None:
    """Fail before any work when the dataset is not there (:class:`teskd_fast.data.DatasetNotFoundError`).

    The message comes from the data package (:data:`teskd_fast.data.catalog.DATASETS`): where it looked and how
    to get the dataset.
    """
    dataset_spec(cfg.dataset).check(data_root(cfg), cfg.download)


def check_device_options(cfg: TrainConfig, env: D.DistEnv) -> None:
    """Refuse, before any work, what this process's device cannot do (:class:`ConfigError`, exit status 2).

    - ``--precision fp16`` needs CUDA (its grad scaler);
    - ``--loader nvjpeg`` needs CUDA and ``--loader dali`` needs DALI installed (for a dataset read by a loader
      backend; the reasons are :func:`teskd_fast.data.imagenet.backend_problem`'s);
    - ``--sync-bn`` in a multi-process run needs CUDA devices (``nn.SyncBatchNorm`` has no CPU path), and cannot
      be compiled: SyncBatchNorm's statistics gather has data-dependent shapes, which ``torch.compile`` cannot put
      into the forward's one graph. Without ``--compile``, ``--sync-bn`` turns compilation off
      (:func:`use_compile`); ``--compile --sync-bn`` is refused.
    """
    dev = env.device
    if cfg.precision == "fp16" and dev.type != "cuda":
        raise ConfigError(f"--precision fp16 needs a CUDA device (this run is on {dev}); use bf16 or fp32")
    if cfg.loader != "auto" and dataset_spec(cfg.dataset).uses_backend:
        problem = backend_problem(cfg.loader, dev, option=lambda name: f"--loader {name}")
        if problem:
            raise ConfigError(problem)
    if cfg.sync_bn and env.distributed:
        if dev.type != "cuda":
            raise ConfigError(f"--sync-bn needs CUDA devices (SyncBatchNorm has no {dev.type} implementation); "
                              "leave it off: gloo processes on the CPU normalise over their own shard")
        if cfg.compile:
            raise ConfigError("--sync-bn cannot be combined with --compile (SyncBatchNorm cannot be traced into "
                              "the forward's single graph); drop --compile (--sync-bn alone trains without "
                              "torch.compile), or drop --sync-bn")


def use_compile(cfg: TrainConfig, env: D.DistEnv) -> bool:
    """Whether the run compiles its model: ``--compile`` / ``--no-compile``, else on with CUDA unless
    ``--sync-bn`` synchronises BatchNorm over several processes (see :func:`check_device_options`)."""
    if cfg.compile is not None:
        return cfg.compile
    return env.device.type == "cuda" and not (cfg.sync_bn and env.distributed)


def build_data(cfg: TrainConfig, env: D.DistEnv, channels_last: bool) -> tuple[Loader, Loader, int]:
    """Training and validation loaders for this process's shard, and the number of classes.

    The dataset's entry of :data:`teskd_fast.data.catalog.DATASETS` builds them.

    Returns:
        ``(train, val, num_classes)``: two :class:`~teskd_fast.data.protocol.Loader` objects yielding
        ``(images, labels)`` on the device, and the number of the training set's classes.
    """
    request = LoaderRequest(
        data_root(cfg), batch_size=cfg.batch_size // env.world_size, device=env.device, seed=cfg.seed,
        rank=env.rank, world_size=env.world_size, channels_last=channels_last, download=cfg.download,
        image_size=cfg.image_size, first_image_size=image_size_at(cfg, 0), val_image_size=cfg.val_image_size,
        val_resize=cfg.val_resize, backend=None if cfg.loader == "auto" else cfg.loader, workers=cfg.workers,
        norm_mean=cfg.norm_mean, norm_std=cfg.norm_std, norm_from_data=cfg.norm_from_data, crop_scale=cfg.crop_scale,
        augment=cfg.folder_augment,
    )
    train, val = dataset_spec(cfg.dataset).loaders(request)
    return train, val, len(train.classes)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The network, initialised from ``cfg.seed``: the TESKD model, or for ``baseline`` its teacher alone.

    The baseline is the TESKD model's exported teacher (for ``--arch timm/NAME``: the very timm model the TESKD
    network wraps, built first from the same seed), so that the two methods start from identical teacher weights
    and differ only in the students and the loss. ``--init`` then loads the teacher's weights (not at a resume: the
    checkpoint holds them).
    """
    import teskd_fast

    torch.manual_seed(cfg.seed)
    students = dict(student_width=cfg.student_width or None, student_levels=student_levels(cfg))
    name = timm_name(cfg.arch)
    if name is not None:
        import timm

        model = timm.create_model(name, num_classes=num_classes, pretrained=False)
        info = dict(getattr(model, "pretrained_cfg", None) or {})
        if cfg.method != "baseline":
            # The students' cost is reported (and warned about) at the run's image size, by the command.
            try:
                model = teskd_fast.wrap(model, num_classes, formulation=cfg.formulation, check_cost=False,
                                          **students)
            except (TypeError, ValueError) as e:
                # wrap()'s refusal of a model TESKD cannot take (a plain ViT, a head it cannot split): a bad --arch.
                raise ConfigError(f"--arch {cfg.arch}: {e}") from None
        check_runs_at_size(model, cfg, info)
    else:
        model = teskd_fast.create_model(cfg.arch, num_classes, stem=cfg.stem, formulation=cfg.formulation,
                                        width=cfg.width, **students)
        if cfg.method == "baseline":
            model = teskd_fast.export_teacher(model)
    if cfg.init and not cfg.resume:
        from teskd_fast.train.init_weights import load_teacher_init

        load_teacher_init(model, cfg.init, say=print if D.launch_rank() == 0 else lambda *a, **k: None)
    if cfg.method == "baseline":
        from teskd_fast.models.teskd import check_plain_input

        # The teacher alone checks its input as the TESKD network does (a clear error, not one from inside conv2d).
        model.register_forward_pre_hook(check_plain_input)
    return model.train()


def smallest_image_size(cfg: TrainConfig) -> int:
    """The smallest side the network sees in this run: CIFAR's 32 px, else the least of the training size (its
    first one when progressive) and the validation crop."""
    if cfg.dataset.startswith("cifar"):
        return 32
    sizes = [cfg.image_size, cfg.val_image_size] + ([cfg.image_size_start] if cfg.image_size_start else [])
    return min(sizes)


def check_runs_at_size(model: nn.Module, cfg: TrainConfig, info: dict[str, Any]) -> None:
    """Refuse, before any work, a timm model that cannot run on this run's images (:class:`ConfigError` naming the
    size it needs), from one forward of a zero batch in eval mode (no random number drawn; the mode restored).

    A model made for a fixed size (timm's ``pretrained_cfg["fixed_input_size"]``: CoaT, LeViT) needs exactly its
    ``input_size``; another one (Inception v3 at 32 px) may fail below some size: the message gives its
    ``input_size`` as the size it is made for.

    Args:
        model: the network (the TESKD network or the plain timm model).
        cfg: the run's configuration.
        info: the timm model's ``pretrained_cfg``.
    """
    size = smallest_image_size(cfg)
    made_for = info.get("input_size", (3, 0, 0))[-1]
    fixed = bool(info.get("fixed_input_size"))
    problem = None
    if fixed and made_for and cfg.image_size_start and cfg.image_size_start != made_for:
        problem = "progressive resizing changes the size"
    else:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
        except (RuntimeError, ValueError, AssertionError, IndexError) as e:
            problem = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        finally:
            model.train(was_training)
    if problem is None:
        return
    where = "CIFAR's images are 32 px" if cfg.dataset.startswith("cifar") else f"--image-size {cfg.image_size}, " \
        f"--val-image-size {cfg.val_image_size}" + (f", --image-size-start {cfg.image_size_start}"
                                                      if cfg.image_size_start else "")
    resize = f" --val-resize {round(made_for * 256 / 224)}" if cfg.val_resize < made_for else ""
    if fixed and made_for:
        need = f"it takes {made_for} px images only (give --image-size {made_for} --val-image-size {made_for}{resize})"
    elif made_for:
        need = (f"it is made for {made_for} px images (give --image-size {made_for} --val-image-size {made_for}"
                f"{resize}, or smaller sizes it runs at)")
    else:
        need = "give a larger --image-size"
    raise ConfigError(f"--arch {cfg.arch} does not run on {size} px images ({where}): {problem}; {need}")


def build_criterion(cfg: TrainConfig, world_size: int) -> Callable:
    """``criterion(output, target) -> (loss, parts)``; with CutMix, ``target`` may be a mixed batch's
    :class:`~teskd_fast.train.mix.MixedTarget`.

    The feature term is a sum over the batch, not a mean; DDP averages gradients over processes, so its
    weight is multiplied by ``world_size`` to keep the global-batch loss of one process.
    """
    if cfg.method == "baseline":
        def criterion(logits, target):
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
            (part,) = BASELINE_PARTS
            return loss, {part: loss.detach()}
    else:
        from teskd_fast import TESKDLoss

        # Every loss option the config has (config.loss_fields), by name.
        options = {name: getattr(cfg, name) for name in loss_fields()}
        options["feat_weight"] *= world_size
        criterion = TESKDLoss(**options, backend="auto", return_parts=True)
    if cfg.cutmix_alpha > 0:
        from teskd_fast.train.mix import with_mixed_targets

        # CutMix's batches come with a MixedTarget: every head's CE on both labels (teskd_fast.loss.mixed).
        return with_mixed_targets(criterion, cfg)
    return criterion


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One group with weight decay; with ``bn_weight_decay=False`` norm weights, biases and every other 1-D
    parameter go without (timm's rule: ``param_groups_weight_decay``, which also excludes every ``ndim <= 1``
    tensor, LayerNorm's and layer scales included)."""
    if cfg.bn_weight_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase)
            (no_decay if is_norm or name == "bias" or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def sgd(params: Any, *, lr: float, momentum: float, nesterov: bool, weight_decay: float = 0.0) -> torch.optim.SGD:
    """PyTorch's fused SGD (one kernel for every parameter; no dampening), its momentum buffers made at zero.

    Fused, the optimiser also takes a grad scaler's ``found_inf`` and scale on the device, so that
    ``GradScaler.step`` does not read ``found_inf`` on the host (a synchronisation per step). It makes the same
    step as the plain ``torch.optim.SGD`` (bitwise in float64, to rounding in float32) and is faster on the CPU
    too. Its first step, though, would make the momentum buffers with ``torch.empty_like`` and fill them only if
    the step is taken: a first step that the scaler skips (an fp16 overflow, usual at the start) would leave
    them uninitialised. Buffers made at zero before the first step (``momentum * 0 + grad`` is the plain
    first step's ``grad`` exactly) keep a skipped step a no-op, as it is for the plain optimiser. Loading a
    ``state_dict`` keeps the optimiser fused and its buffers present.

    Args:
        params: parameters or parameter groups (each group may set its ``weight_decay``).
        lr, momentum, nesterov, weight_decay: as for ``torch.optim.SGD``.

    Returns:
        the optimiser.
    """
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                fused=True)
    _zero_momentum(optimizer)
    optimizer.register_load_state_dict_post_hook(_stay_fused)
    return optimizer


def _zero_momentum(optimizer: torch.optim.SGD) -> None:
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            if optimizer.state[p].get("momentum_buffer") is None:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _stay_fused(optimizer: torch.optim.SGD) -> None:
    # A state_dict brings its own param_groups, "fused" included (False from a plain optimiser), and may have no
    # momentum buffers yet (saved before the first step).
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
    _zero_momentum(optimizer)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``--opt``'s optimiser over :func:`param_groups`: SGD with (Nesterov) momentum (fused, see :func:`sgd`), or
    AdamW (:func:`teskd_fast.train.optim.adamw`)."""
    if cfg.opt == "adamw":
        from teskd_fast.train.optim import adamw

        device = next(model.parameters()).device
        return adamw(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                     weight_decay=cfg.weight_decay, device=device)
    return sgd(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
