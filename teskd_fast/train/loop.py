"""The training loop: data, model, loss, optimiser, schedule, epochs, evaluation, checkpoints, exact resume.

Exact resume. A checkpoint holds the model, optimiser, schedule, grad-scaler and every RNG state, the number of
finished epochs, the global step, and the position inside the current epoch together with the epoch's running
sums. The loaders draw each epoch's order and augmentation from ``(seed, epoch)`` and can start at any batch, so
a run stopped by SIGTERM in the middle of an epoch and resumed ends, on the CPU, with the same weights and
metrics as a run never stopped (tested with the digits and CIFAR loaders). The ImageNet loaders resume at the
same batch with the same remaining images; DALI's random crops after a mid-epoch resume come from a restarted
pipeline, so a DALI run is exact only when resumed at an epoch boundary. On a GPU, cuDNN and atomics make
even an uninterrupted run not bitwise repeatable; a resumed one is then as close as two uninterrupted runs.

Synchronisation. Per step, the loop queues work on the device and never waits for it: losses, parts, accuracy
and a non-finite marker are summed on the device and read once per epoch; the progress bar shows values copied
to the host without blocking (a few steps late on CUDA).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from teskd_fast.train import distributed as D
from teskd_fast.train.checkpoint import atomic_copy, atomic_save, load_checkpoint, rng_state, set_rng_state
from teskd_fast.train.config import ConfigError, TrainConfig
from teskd_fast.train.metrics import EvalAccumulator, LaggedReader, MetricsLog, TrainAccumulator, head_names

CHECKPOINT_FORMAT = "teskd_fast.train/1"


class DatasetNotFound(FileNotFoundError):
    """The dataset is not where the config says; the message says where we looked and how to get it."""


class NonFiniteLoss(RuntimeError):
    """The loss went NaN or infinite; the message names the step and the loss part."""


class Interrupted(RuntimeError):
    """SIGTERM or Ctrl-C stopped the run after writing last.pt."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _cifar_folder(dataset: str) -> tuple[str, str]:
    return ("cifar-100-python", "cifar-100-python.tar.gz") if dataset == "cifar100" else (
        "cifar-10-batches-py", "cifar-10-python.tar.gz")


def data_root(cfg: TrainConfig) -> Path:
    return Path(cfg.data_dir or "data").expanduser()


def check_dataset(cfg: TrainConfig) -> None:
    """Fail before any work when the dataset is not there, saying where we looked and how to get it."""
    root = data_root(cfg)
    if cfg.dataset == "digits":
        return
    if cfg.dataset in ("cifar10", "cifar100"):
        folder, archive = _cifar_folder(cfg.dataset)
        looked = [root / folder, root / archive]
        test_file = "test" if cfg.dataset == "cifar100" else "test_batch"
        if (root / folder / test_file).is_file() or (root / archive).is_file() or (root / test_file).is_file() \
                or (root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar"))) or cfg.download:
            return
        name = "CIFAR-100" if cfg.dataset == "cifar100" else "CIFAR-10"
        tv = "CIFAR100" if cfg.dataset == "cifar100" else "CIFAR10"
        raise DatasetNotFound(
            f"{name} not found. Looked for the folder {looked[0]} and the archive {looked[1]}"
            f" (from --data-dir {root}).\n"
            f"Get it with --download (torchvision's downloader), or:\n"
            f"  python -c \"import torchvision; torchvision.datasets.{tv}('{root}', download=True)\"\n"
            f"or download https://www.cs.toronto.edu/~kriz/{archive} into {root}."
        )
    train, val = root / "train", root / "val"
    missing = [p for p in (train, val) if not p.is_dir() or not any(p.iterdir())]
    if missing:
        raise DatasetNotFound(
            f"ImageNet not found: {', '.join(str(p) for p in missing)} missing or empty (from --data-dir {root}).\n"
            "Expected the ImageFolder layout ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG. Get ILSVRC-2012 "
            "from https://image-net.org/download (registration needed), extract it, sort the validation images "
            "into class folders, then run `teskd-scan ROOT` once to check every file."
        )


def num_classes_of(cfg: TrainConfig) -> int:
    return {"digits": 10, "cifar10": 10, "cifar100": 100}.get(cfg.dataset, 0)


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
        return train, val, num_classes_of(cfg)
    from teskd_fast.data import imagenet_loaders

    train, val = imagenet_loaders(
        str(data_root(cfg)), batch_size=per_rank, backend=None if cfg.loader == "auto" else cfg.loader,
        image_size=image_size_at(cfg, 0), val_resize=cfg.val_resize, val_image_size=cfg.val_image_size,
        device=env.device, rank=env.rank, world_size=env.world_size, workers=cfg.workers, seed=cfg.seed,
        channels_last=channels_last,
    )
    return train, val, len(train.classes)


def image_size_at(cfg: TrainConfig, epoch: int) -> int:
    """Progressive resizing: training size for epoch ``epoch`` (0-based), a multiple of 32 ramping linearly."""
    if not cfg.image_size_start:
        return cfg.image_size
    end = max(1, round(cfg.progressive_end * cfg.epochs) - 1)
    frac = min(1.0, epoch / end)
    size = cfg.image_size_start + frac * (cfg.image_size - cfg.image_size_start)
    return int(round(size / 32) * 32)


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
        model = teskd_fast.export_teacher(model)
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


class LRSchedule:
    """Learning rate as a function of (epoch, step in epoch): warm-up, then multistep, cosine or linear decay.

    Computed on the host from the config, so a resumed or extended run (a larger ``epochs``) follows the new total.
    Multistep decays at whole epochs, as the reference's per-epoch ``MultiStepLR``.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int):
        self.cfg, self.steps_per_epoch = cfg, max(1, steps_per_epoch)

    def __call__(self, epoch: int, step_in_epoch: int) -> float:
        cfg, n = self.cfg, self.steps_per_epoch
        t = epoch + step_in_epoch / n
        if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
            return cfg.lr * (epoch * n + step_in_epoch + 1) / (cfg.warmup_epochs * n)
        if cfg.schedule == "multistep":
            passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.lr_milestones)
            return cfg.lr * cfg.lr_gamma**passed
        frac = (t - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
        frac = min(max(frac, 0.0), 1.0)
        if cfg.schedule == "cosine":
            return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        return cfg.lr * (1.0 - frac)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.cfg.schedule, "epochs": self.cfg.epochs, "steps_per_epoch": self.steps_per_epoch}


def _student_list(student_logits) -> list[torch.Tensor]:
    if isinstance(student_logits, torch.Tensor):
        return list(student_logits.unbind(0))
    return list(student_logits)


class Trainer:
    """One training run in ``run_dir``; on rank 0 it writes the logs and checkpoints.

    Args:
        cfg: the resolved configuration.
        run_dir: the run folder (created).
        env: the process's place in the job (from :func:`teskd_fast.train.distributed.setup`).
        resume: a checkpoint dict to continue from, or None.
        on_step: called after every optimiser step as ``on_step(trainer)`` (progress hooks, tests).
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, env: D.DistEnv, resume: dict | None = None,
                 on_step: Callable[[Trainer], None] | None = None):
        self.cfg, self.run_dir, self.env, self.on_step = cfg, Path(run_dir), env, on_step
        if cfg.batch_size % env.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} (global) is not divisible by the "
                             f"{env.world_size} processes")
        dev = env.device
        self.precision = cfg.precision if cfg.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
        if self.precision == "fp16" and dev.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else dev.type == "cuda"
        use_compile = cfg.compile if cfg.compile is not None else dev.type == "cuda"

        check_dataset(cfg)
        self.train_loader, self.val_loader, self.num_classes = build_data(cfg, env, self.channels_last)
        self.model = build_model(cfg, self.num_classes).to(dev)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and env.distributed:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.raw_model = self.model
        self.criterion = build_criterion(cfg, env.world_size)
        self.optimizer = torch.optim.SGD(param_groups(self.raw_model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov and cfg.momentum > 0)
        self.scaler = torch.amp.GradScaler(dev.type) if self.precision == "fp16" else None
        n = len(self.train_loader)
        self.steps_per_epoch = min(n, cfg.steps_per_epoch) if cfg.steps_per_epoch else n
        if self.steps_per_epoch < 1:
            raise ConfigError(f"the training set gives no batch of {cfg.batch_size // env.world_size} per process")
        self.schedule = LRSchedule(cfg, self.steps_per_epoch)

        self.epoch, self.position, self.step = 0, 0, 0
        self.best = {"top1": -1.0, "epoch": 0}
        self.parts = ["ce"] if cfg.method == "baseline" else ["ce", "kd", "feat"]
        self.acc = TrainAccumulator(self.parts, dev)
        self._epoch_elapsed = 0.0
        self._acc_state: dict[str, torch.Tensor] | None = None
        if resume is not None:
            self._load(resume)

        forward_model = self.model
        if use_compile:
            forward_model = self._compile(forward_model)
        if env.distributed:
            ids = [dev.index] if dev.type == "cuda" else None
            forward_model = nn.parallel.DistributedDataParallel(forward_model, device_ids=ids)
        self.forward_model = forward_model
        self._stop_signal: int | None = None

    def _compile(self, model: nn.Module) -> nn.Module:
        # Static shapes: the last partial batch of an epoch gets its own graph (compiled once) instead of
        # turning every batch's graph dynamic.
        mode = None if self.cfg.compile_mode == "default" else self.cfg.compile_mode
        if self.cfg.method == "teskd":
            import teskd_fast

            return teskd_fast.compile_model(model, mode=mode, dynamic=False)
        return torch.compile(model, mode=mode, dynamic=False)

    # Checkpoints.

    def state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "num_classes": self.num_classes,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "accumulator": self._acc_state if self.position else None,
            "epoch_elapsed": self._epoch_elapsed if self.position else 0.0,
            "best": dict(self.best),
        }

    def _load(self, ckpt: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.position, self.step = ckpt["epoch"], ckpt["position"], ckpt["step"]
        self.best = dict(ckpt["best"])
        if self.position and ckpt.get("accumulator") is not None:
            # The saved sums are already reduced over the processes: rank 0 carries them, the others start at
            # zero, and the epoch's final all-reduce gives the same totals for any number of processes.
            if self.env.is_main:
                self.acc.load_state_dict(ckpt["accumulator"])
            self._epoch_elapsed = ckpt.get("epoch_elapsed", 0.0)
        if self.position >= self.steps_per_epoch:
            raise ConfigError(f"checkpoint position {self.position} is past this config's epoch of "
                             f"{self.steps_per_epoch} steps")
        set_rng_state(ckpt["rng"])

    def save(self, best: bool = False) -> None:
        if not self.env.is_main:
            return
        atomic_save(self.state(), self.run_dir / "last.pt")
        if best:
            atomic_copy(self.run_dir / "last.pt", self.run_dir / "best.pt")

    # Signals.

    def _handler(self, signum, frame):
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_signal = signum
        if self.env.is_main:
            name = signal.Signals(signum).name
            print(f"\nteskd-train: {name} received: finishing this step, then writing last.pt "
                  "(Ctrl-C again to abandon)", flush=True)

    @contextlib.contextmanager
    def _signals(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _should_stop(self, step_in_epoch: int) -> bool:
        if not self.env.distributed:
            return self._stop_signal is not None
        # Processes must agree on the step at which they stop: one small all-reduce every log_every steps.
        if step_in_epoch % self.cfg.log_every:
            return False
        return D.any_rank(self._stop_signal is not None, self.env)

    # Steps.

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train_step(self, images: torch.Tensor, target: torch.Tensor, step_tensor: torch.Tensor) -> None:
        """One optimiser step on this process's batch; the loss and its parts are summed on the device."""
        with self._autocast():
            out = self.forward_model(images)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            loss, parts = self.criterion(out, target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.acc.update(step_tensor, loss, parts, logits, target)

    def _nonfinite_message(self, bad: dict[str, int]) -> str:
        first = min(bad.values())
        which = sorted((k for k, v in bad.items() if v == first), key=lambda k: (k != "loss", k))
        names = ", ".join("total loss" if k == "loss" else f"'{k}' part" for k in which)
        epoch = first // self.steps_per_epoch + 1
        return (f"non-finite loss at global step {first} (epoch {epoch}, batch {first % self.steps_per_epoch}): "
                f"{names} went NaN/inf. Stopped; last.pt keeps the last good state (end of epoch {self.epoch}).")

    def train_epoch(self) -> dict[str, Any]:
        """Train from ``self.position`` to the end of epoch ``self.epoch`` and return its train metrics."""
        cfg, dev = self.cfg, self.env.device
        self.forward_model.train()
        loader = self.train_loader
        if hasattr(loader, "set_image_size") and cfg.image_size_start:
            loader.set_image_size(image_size_at(cfg, self.epoch))
        start = self.position
        if start == 0:
            self.acc = TrainAccumulator(self.parts, dev)
            self._epoch_elapsed = 0.0
        try:
            # Our loaders draw the epoch's order and augmentation from (seed, epoch) and start at any batch.
            loader.set_epoch(self.epoch, start_batch=start)
        except TypeError:
            # A loader of another library that cannot seek: its epoch restarts (exact only between epochs).
            loader.set_epoch(self.epoch)
        steps = self.steps_per_epoch
        first_step = self.epoch * steps
        step_ids = torch.arange(first_step, first_step + steps, device=dev)
        reader = LaggedReader(dev)
        bar = None
        if cfg.progress and self.env.is_main:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=start, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                       dynamic_ncols=True)
        t0 = time.perf_counter()
        images_done = 0
        i = start
        try:
            for batch in loader:
                if i >= steps:
                    break
                images, target = batch
                self._set_lr(self.schedule(self.epoch, i))
                self.train_step(images, target, step_ids[i])
                i += 1
                self.step += 1
                self.position = i
                images_done += target.shape[0]
                if self.on_step is not None:
                    self.on_step(self)
                if i % cfg.log_every == 0 or i == steps:
                    reader.push(torch.cat([self.acc.sums[:1], self.acc.sums[-1:], self.acc.first_bad.double()]))
                    latest = reader.latest()
                    if latest is not None:
                        # A non-finite step seen early: stop now (one process alone must not leave a DDP job,
                        # which instead stops at the epoch's end, where the marker is reduced).
                        if min(latest[2:]) < 2**62 and not self.env.distributed:
                            break
                        if bar is not None:
                            rate = images_done * self.env.world_size / max(time.perf_counter() - t0, 1e-9)
                            bar.set_postfix(loss=f"{latest[0] / max(latest[1], 1):.4f}", img_s=f"{rate:.0f}")
                    if bar is not None:
                        bar.update(i - bar.n)
                if i < steps and self._should_stop(i):
                    break
        finally:
            if bar is not None:
                bar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self._epoch_elapsed += time.perf_counter() - t0
        # The one synchronisation of the epoch: reduce the sums over processes and read them.
        sums = D.all_reduce(self.acc.sums.clone(), self.env, "sum")
        bad = D.all_reduce(self.acc.first_bad.clone(), self.env, "min")
        metrics = self.acc.unpack(torch.cat([sums, bad.double()]).tolist(), self.env.world_size)
        if metrics["_nonfinite"]:
            raise NonFiniteLoss(self._nonfinite_message(metrics["_nonfinite"]))
        if self.position < steps:
            signum = self._stop_signal or signal.SIGTERM
            self._acc_state = {"sums": sums.cpu(), "first_bad": bad.cpu()}
            self.save()
            name = signal.Signals(signum).name
            raise Interrupted(
                f"teskd-train: stopped by {name} at epoch {self.epoch + 1}, batch {self.position}/{steps}; "
                f"last.pt written. Continue with: teskd-train --resume {self.run_dir}", signum)
        metrics["lr"] = self.schedule(self.epoch, steps - 1)
        metrics["train_time"] = self._epoch_elapsed
        metrics["images_per_s"] = metrics.pop("_images") / max(self._epoch_elapsed, 1e-9)
        if start:
            metrics["resumed_mid_epoch"] = True
        return metrics

    @torch.no_grad()
    def evaluate(self, loader=None) -> dict[str, float]:
        """Top-1 / top-5 of every head and the ensemble on the validation set (reduced over processes)."""
        loader = loader if loader is not None else self.val_loader
        self.forward_model.eval()
        acc = None
        for images, target in loader:
            with self._autocast():
                out = self.forward_model(images)
            heads = [out] if isinstance(out, torch.Tensor) else [out.logits] + _student_list(out.student_logits)
            if acc is None:
                acc = EvalAccumulator(head_names(len(heads) - 1), self.env.device)
            acc.update(heads, target)
        if acc is None:
            raise RuntimeError("the validation loader gave no batch")
        vec = D.all_reduce(acc.packed(), self.env, "sum")
        return acc.unpack(vec.tolist())

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.epochs``, evaluating, logging and checkpointing every epoch; return the summary."""
        cfg = self.cfg
        log = MetricsLog(self.run_dir, tensorboard=cfg.tensorboard, keep_epochs=self.epoch) if self.env.is_main \
            else None
        try:
            with self._signals():
                while self.epoch < cfg.epochs:
                    train = self.train_epoch()
                    t0 = time.perf_counter()
                    val = self.evaluate()
                    self.epoch += 1
                    self.position = 0
                    top1 = val["val_top1_teacher"]
                    is_best = top1 > self.best["top1"]
                    if is_best:
                        self.best = {"top1": top1, "epoch": self.epoch}
                    row = {"epoch": self.epoch, "step": self.step, **train, **val,
                           "eval_time": time.perf_counter() - t0}
                    row["epoch_time"] = row["train_time"] + row["eval_time"]
                    row = {k: v for k, v in row.items() if not k.startswith("_")}
                    self.save(best=is_best)
                    if log is not None:
                        log.log(row)
                        self._print_epoch(row)
                    # Every process stops after the same epoch, even if the signal reached only some of them.
                    if D.any_rank(self._stop_signal is not None, self.env) and self.epoch < cfg.epochs:
                        signum = self._stop_signal or signal.SIGTERM
                        raise Interrupted(f"teskd-train: stopped by {signal.Signals(signum).name} after epoch "
                                          f"{self.epoch}; last.pt written. Continue with: teskd-train --resume "
                                          f"{self.run_dir}", signum)
        finally:
            if log is not None:
                log.close()
        return self.finish()

    def _print_epoch(self, row: dict[str, Any]) -> None:
        heads = [k[len("val_top1_"):] for k in row if k.startswith("val_top1_")]
        accs = " ".join(f"{h} {row['val_top1_' + h]:.2f}" for h in heads)
        parts = " ".join(f"{p} {row['train_' + p]:.4g}" for p in self.parts)
        print(f"epoch {row['epoch']:>3}/{self.cfg.epochs}  loss {row['train_loss']:.4f} ({parts})  "
              f"top-1 {accs}  lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  {row['epoch_time']:.1f}s",
              flush=True)

    def finish(self) -> dict[str, Any]:
        """Write teacher.pt (and teacher.json), summary.json and curves.png; print every head's accuracy."""
        if not self.env.is_main:
            return {}
        import json

        from teskd_fast.train.metrics import read_metrics

        rows = read_metrics(self.run_dir)
        last = rows[-1] if rows else {}
        after = round(self.cfg.report_after * self.cfg.epochs)
        late = [r for r in rows if r["epoch"] > after] or rows
        best_late = max(late, key=lambda r: r["val_top1_teacher"]) if late else {}
        summary = {
            "method": self.cfg.method, "preset": self.cfg.preset, "epochs": self.epoch,
            "final": {k[len("val_"):]: v for k, v in last.items() if k.startswith("val_top")},
            "best_teacher_top1": self.best["top1"], "best_epoch": self.best["epoch"],
            f"best_teacher_top1_after_epoch_{after}": best_late.get("val_top1_teacher"),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.export_teacher()
        if self.cfg.plot:
            from teskd_fast.train.plot import plot_run

            try:
                plot_run(self.run_dir)
            except ImportError as e:
                print(f"teskd-train: no curves.png: {e}")
        print_summary(summary, self.run_dir)
        return summary

    def export_teacher(self) -> Path:
        """RUN_DIR/teacher.pt: the plain torchvision teacher's state_dict; teacher.json says how to build it."""
        import json

        import teskd_fast

        teacher = self.raw_model if self.cfg.method == "baseline" else teskd_fast.export_teacher(self.raw_model)
        state = {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
        atomic_save(state, self.run_dir / "teacher.pt")
        info = {"arch": self.cfg.arch, "num_classes": self.num_classes, "stem": self.cfg.stem, "width": self.cfg.width,
                "build": "teskd_fast.models.resnet.build_resnet(arch, num_classes, stem=stem, width=width); with "
                         "width 1 and the imagenet stem: torchvision.models.<arch>(num_classes=num_classes)"}
        (self.run_dir / "teacher.json").write_text(json.dumps(info, indent=2) + "\n")
        return self.run_dir / "teacher.pt"


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    final = summary["final"]
    heads = [k[len("top1_"):] for k in final if k.startswith("top1_")]
    print(f"\nTest accuracy after {summary['epochs']} epochs ({summary['method']}, {summary['preset']}):")
    for h in heads:
        print(f"  {h:<10} top-1 {final['top1_' + h]:6.2f}%   top-5 {final['top5_' + h]:6.2f}%")
    late = [k for k in summary if k.startswith("best_teacher_top1_after")]
    print(f"  best teacher top-1 {summary['best_teacher_top1']:.2f}% (epoch {summary['best_epoch']})"
          + (f"; {late[0].replace('_', ' ')}: {summary[late[0]]:.2f}%" if late and summary[late[0]] is not None
             else ""))
    print(f"Run folder: {run_dir}")


def load_resume(run_dir: str | Path) -> dict[str, Any]:
    """The last.pt of a run folder, checked to be one of ours."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no last.pt there (nothing to resume)")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {run_dir}: {path} is not a teskd-train checkpoint")
    return ckpt
