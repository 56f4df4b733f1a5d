"""``teskd_fast.train.fit``: train your own model on your own data with the ``teskd-train`` loop.

The model is any network :func:`teskd_fast.wrap` takes (a timm classifier, a torchvision ResNet, a timm
``features_only`` model) or a TESKD network already built; the data are any iterables of ``(images, labels)``
batches, typically a ``torch.utils.data.DataLoader`` over your own ``Dataset``. The run folder is the one
``teskd-train`` writes (config.yaml, metrics.jsonl / metrics.csv, last.pt, best.pt, teacher.pt, teacher.json,
summary.json), so that ``teskd-plot`` and ``teskd-compare --report-only`` read it; the optimiser, schedule, EMA,
accumulation and clipping options are :class:`~teskd_fast.train.config.TrainConfig`'s.

Exact resume (``fit(..., resume=True)`` after a SIGTERM or Ctrl-C) needs to know where the loader was. A
``DataLoader`` says it, when:

- its order is a function of the epoch: a sampler with ``set_epoch`` (``DistributedSampler``), a
  ``SequentialSampler`` (``shuffle=False``), or a ``RandomSampler`` (``shuffle=True``) given no ``generator``,
  which :class:`EpochLoader` seeds from ``(config.seed, epoch)`` every epoch (as the package's own loaders draw
  their order);
- its random augmentations (in the ``Dataset``) draw from torch's generator: with ``num_workers=0`` the resumed
  epoch skips the batches already trained without loading them and continues with the restored generator; with
  workers, each worker's seed comes from a generator seeded from ``(config.seed, epoch)`` (the pass's base seed,
  which a ``DataLoader`` would otherwise draw from torch's global generator) and the skipped batches are loaded
  again (and dropped) so that every worker's generator is where it was.

Where a loader cannot say (a ``DataLoader`` built with its own ``generator``, an ``IterableDataset``, a plain
iterable), a resume inside an epoch calls the iterable's ``set_epoch(epoch)`` when it has one, then drops the
first batches of a fresh pass: exact only if the pass repeats the interrupted one. A warning says so. A resume
between epochs never depends on the loader's position.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teskd_fast.train.config import ConfigError, TrainConfig, resolve
from teskd_fast.train.trainer import Trainer


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7 + stream) % 2**63)


class EpochLoader:
    """An iterable of ``(images, labels)`` batches made into a :class:`teskd_fast.data.protocol.Loader`: it moves
    the batches to ``device``, draws each epoch's order from ``(seed, epoch)`` where it can, and starts an epoch
    at any batch (see the module for when that is exact).

    Args:
        batches: a ``DataLoader`` or any re-iterable of ``(images, labels)``: images ``[B, 3, H, W]`` float, labels
            ``[B]`` int64 class indices.
        device: where the batches go.
        seed: the run's seed.
        channels_last: convert the images to channels-last.
    """

    def __init__(self, batches: Iterable, device: torch.device, seed: int = 0, channels_last: bool = False):
        self.batches, self.device, self.seed, self.channels_last = batches, torch.device(device), seed, channels_last
        self.epoch, self.start_batch = 0, 0
        self.warned = False

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def batch_size(self) -> int | None:
        return getattr(self.batches, "batch_size", None)

    @property
    def num_samples(self) -> int:
        sampler = getattr(self.batches, "sampler", None)
        if sampler is None or getattr(self.batches, "batch_size", None) is None:
            raise AttributeError("num_samples")
        return len(sampler)

    @property
    def drop_last(self) -> bool:
        return bool(self.batches.drop_last)

    def _is_map_loader(self) -> bool:
        from torch.utils.data import DataLoader, IterableDataset

        return isinstance(self.batches, DataLoader) and not isinstance(self.batches.dataset, IterableDataset)

    def _prepare(self) -> bool:
        """Put the epoch into the loader; returns whether it then knows where each batch is."""
        from torch.utils.data import RandomSampler, SequentialSampler

        b = self.batches
        if not self._is_map_loader():
            if hasattr(b, "set_epoch"):
                b.set_epoch(self.epoch)
            return False
        sampler = b.batch_sampler.sampler if b.batch_sampler is not None else b.sampler
        own_generator = b.generator is not None and not getattr(b, "_teskd_seeded", False)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
            known = True
        elif isinstance(sampler, RandomSampler):
            known = not own_generator
            if known:
                sampler.generator = _epoch_generator(self.seed, self.epoch, 0)
        else:
            known = isinstance(sampler, SequentialSampler)
        if not own_generator:
            # The base seed each pass draws (the workers' seeds): from (seed, epoch), not from torch's global
            # generator, whose state at a resume is the interrupted step's.
            b.generator = _epoch_generator(self.seed, self.epoch, 1)
            b._teskd_seeded = True
        return known and not own_generator

    def _skip_without_loading(self, start: int) -> Iterator:
        b = self.batches
        indices = iter(b.batch_sampler)
        for _ in range(start):
            next(indices, None)
        getitems = getattr(b.dataset, "__getitems__", None)
        for idx in indices:
            samples = getitems(idx) if getitems is not None else [b.dataset[i] for i in idx]
            yield b.collate_fn(samples)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, self.start_batch = self.start_batch, 0
        known = self._prepare()
        if start and self._is_map_loader() and self.batches.num_workers == 0 and self.batches.batch_sampler:
            source = self._skip_without_loading(start)
        else:
            source = iter(self.batches)
            if start and not known and not self.warned:
                warnings.warn(f"resuming inside epoch {self.epoch + 1}: the training batches cannot say where they "
                              f"were; the first {start} batches of a fresh pass are dropped (exact only if the pass "
                              "repeats the interrupted one; see teskd_fast.train.api)", stacklevel=2)
                self.warned = True
            for _ in range(start):
                next(source, None)
        for batch in source:
            images, labels = batch[0], batch[1]
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)


def _num_classes(model: nn.Module, given: int | None) -> int:
    if given is not None:
        return int(given)
    base = getattr(model, "_orig_mod", model)
    for read in (lambda m: m.num_classes, lambda m: m.fc.out_features):
        try:
            n = read(base)
        except AttributeError:
            continue
        if isinstance(n, int) and n > 0:
            return n
    raise ConfigError(f"fit: cannot tell the number of classes of {type(base).__name__}; pass num_classes=")


def _network(model: nn.Module, cfg: TrainConfig, num_classes: int) -> nn.Module:
    import teskd_fast
    from teskd_fast.models.teskd import TESKDNet

    is_teskd = isinstance(getattr(model, "_orig_mod", model), TESKDNet)
    if cfg.method == "baseline":
        if is_teskd:
            raise ConfigError("fit: method baseline trains the plain model; pass it before teskd_fast.wrap")
        return model
    return model if is_teskd else teskd_fast.wrap(model, num_classes, formulation=cfg.formulation)


def _config(config: TrainConfig | dict[str, Any] | None) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    return resolve(dict(config or {}))


def fit(model: nn.Module, train_loader: Iterable, val_loader: Iterable,
        config: TrainConfig | dict[str, Any] | None = None, *, out: str | Path, num_classes: int | None = None,
        resume: bool = False, on_step: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Train ``model`` with TESKD (or, ``method="baseline"``, alone) on your batches; returns the run's summary.

    Args:
        model: the teacher to be: a network :func:`teskd_fast.wrap` takes (it is wrapped here with the TESKD
            students), or a TESKD network; with ``method="baseline"`` the plain model, trained alone with
            cross-entropy. Its weights are trained in place.
        train_loader: the training batches ``(images, labels)``: images ``[B, 3, H, W]`` float (normalised as the
            model expects), labels ``[B]`` int64; typically a ``DataLoader`` over your ``Dataset`` (``drop_last``
            or a last batch of 2 or more images: a batch of 1 is left out, BatchNorm cannot train on it).
        val_loader: the validation batches, the same way.
        config: a :class:`TrainConfig` or a dict of its fields (over the ``digits-demo`` preset): ``epochs``,
            ``opt``, ``lr``, ``weight_decay``, ``schedule``, ``warmup_epochs``, ``ema_decay``, ``accum_steps``,
            ``clip_grad``, the loss weights, ``device``, ``seed``, ... Its ``dataset``, ``data_dir``, ``arch``,
            ``stem``, ``width``, ``image_size`` and loader fields are not used. ``batch_size`` is taken from the
            training loader.
        out: the run folder (created; refused when it already holds a run, unless ``resume``).
        num_classes: the classes (read from the model when None: ``num_classes`` or ``fc.out_features``).
        resume: continue the run in ``out`` from its last.pt when there is one (exactly; see the module for the
            loaders); start it otherwise.
        on_step: called after every training batch with the trainer.

    Returns:
        the content of ``out/summary.json`` (final and best accuracies of every head).

    Raises:
        ConfigError: a bad configuration; RunFolderRefused: ``out`` in use or holding another run;
        teskd_fast.train.trainer.Interrupted: SIGTERM / Ctrl-C stopped the run after writing last.pt;
        teskd_fast.train.trainer.NonFiniteLoss: the loss went NaN or infinite.
    """
    import contextlib
    import dataclasses

    import yaml

    from teskd_fast.train import distributed as D
    from teskd_fast.train.checkpoint import atomic_write_text, load_resume
    from teskd_fast.train.runfolder import RunFolderRefused, RunLock, check_resume

    cfg = _config(config)
    env = D.setup(cfg.device)
    batch = getattr(train_loader, "batch_size", None)
    if batch is not None and batch * env.world_size != cfg.batch_size:
        cfg = dataclasses.replace(cfg, batch_size=batch * env.world_size)
    run_dir = Path(out)
    n = _num_classes(model, num_classes)
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as held:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
            held.callback(torch.set_num_threads, threads)
        run_dir.mkdir(parents=True, exist_ok=True)
        if env.is_main:
            held.enter_context(RunLock(run_dir))
        ckpt = None
        if (run_dir / "last.pt").exists():
            if not resume:
                raise RunFolderRefused(f"{run_dir} already holds a run; continue it with fit(..., resume=True) or "
                                       "choose another out")
            ckpt = load_resume(run_dir)
            check_resume(run_dir, ckpt, cfg)
        network = _network(model, cfg, n)
        channels_last = cfg.channels_last if cfg.channels_last is not None else env.device.type == "cuda"
        data = (EpochLoader(train_loader, env.device, cfg.seed, channels_last),
                EpochLoader(val_loader, env.device, cfg.seed, channels_last), n)
        trainer = FitTrainer(cfg, run_dir, env, resume=ckpt, on_step=on_step, model=network, data=data)
        if env.is_main:
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            what = f"resuming from epoch {trainer.epoch + 1}, batch {trainer.position}" if ckpt else "training"
            print(f"teskd_fast.train.fit: {what} {cfg.method} {type(model).__name__} | {cfg.epochs} epochs, "
                  f"batch {cfg.batch_size}, device {env.device} | run folder {run_dir}", file=sys.stderr, flush=True)
        return trainer.fit()


class FitTrainer(Trainer):
    """The :class:`~teskd_fast.train.trainer.Trainer` of :func:`fit`: teacher.json names the user's model."""

    def export_teacher(self) -> Path:
        import teskd_fast
        from teskd_fast.train.checkpoint import atomic_save, atomic_write_text
        from teskd_fast.train.ema import teacher_keys

        model = self.ema.module if self.cfg.export == "ema" and self.ema is not None else self.raw_model
        build = "the model given to teskd_fast.train.fit (before wrap); load_state_dict(teacher.pt)"
        try:
            teacher = model if self.cfg.method == "baseline" else teskd_fast.export_teacher(model)
            state, name = teacher.state_dict(), f"{type(teacher).__module__}.{type(teacher).__name__}"
        except TypeError:
            # A features_only backbone: its teacher is the TESKD network's backbone and head, not a model of its own.
            full = model.state_dict()
            state, name = {k: full[k] for k in teacher_keys(model)}, f"teskd_fast.wrap({type(model.backbone).__name__})"
            build = ("teskd_fast.wrap(the model given to fit, num_classes); load_state_dict(teacher.pt, strict=False) "
                     "(the teacher's entries; the students' are not kept)")
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_save(state, self.run_dir / "teacher.pt")
        info = {"model": name, "num_classes": self.num_classes, "build": build}
        atomic_write_text(self.run_dir / "teacher.json", json.dumps(info, indent=2) + "\n")
        return self.run_dir / "teacher.pt"
