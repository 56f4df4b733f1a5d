"""The :class:`Trainer`: epochs, training steps, evaluation, checkpoints, signals, exact resume.

What it trains is built by :mod:`.build`, its learning rate comes from :mod:`.schedule`, what it reports is
written by :mod:`.report`.

Exact resume. A checkpoint holds the model, optimiser, grad-scaler, the teacher's EMA (``--ema-decay``), the
gradients of an unfinished accumulation (``--accum-steps``) and every RNG state, the number of
finished epochs, the global step, the position inside the current epoch together with the epoch's running
sums, and the metrics row of every finished epoch. The rows make the checkpoint the one record of the run: a
resume rewrites metrics.jsonl / metrics.csv to exactly its rows, so a process killed after writing last.pt
and before logging the epoch, or after logging epochs past last.pt, leaves one row per finished epoch.

The loaders draw each epoch's order and augmentation from ``(seed, epoch)`` and can start at any batch, so a
run stopped by SIGTERM in the middle of an epoch and resumed ends, on the CPU, with the same weights and metrics
as a run never stopped (tested with the digits and CIFAR loaders). The ImageNet loaders resume at the same
batch with the same remaining images; the dali and nvjpeg loaders also with the same crops and flips (drawn
per batch from the seed), the torchvision loader with crops drawn afresh. On a GPU, cuDNN and atomics make even
an uninterrupted run not bitwise repeatable; a resumed one is then as close as two uninterrupted runs.

Synchronisation. Per step, the loop queues work on the device and never waits for it: losses, parts, accuracy
and a non-finite marker are summed on the device and read once per epoch; the progress bar shows values copied
to the host without blocking (a few steps late on CUDA).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teskd_fast.device import configure_backends
from teskd_fast.loss.options import BASELINE_PARTS, PARTS
from teskd_fast.train import distributed as D
from teskd_fast.train import report
from teskd_fast.train.batches import EagerTails, check_batches, train_steps
from teskd_fast.train.build import (
    build_criterion,
    build_data,
    build_model,
    build_optimizer,
    check_dataset,
    check_device_options,
    use_compile,
)
from teskd_fast.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_copy,
    atomic_save,
    repair_best,
    rng_state,
    set_rng_state,
)
from teskd_fast.train.config import ConfigError, TrainConfig
from teskd_fast.train.ema import TeacherEMA
from teskd_fast.train.metrics import (
    NO_STEP,
    EvalAccumulator,
    LaggedReader,
    MetricsLog,
    TrainAccumulator,
    head_names,
    read_metrics,
)
from teskd_fast.train.mix import build_mix, labels
from teskd_fast.train.optim import Accumulation, grads_state, load_grads_state, optimizer_step
from teskd_fast.train.schedule import LRSchedule, image_size_at


class NonFiniteLoss(RuntimeError):
    """The loss went NaN or infinite; the message names the step and the loss part."""


class Interrupted(RuntimeError):
    """SIGTERM or Ctrl-C stopped the run after writing last.pt."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Abandoned(KeyboardInterrupt):
    """A second SIGTERM or Ctrl-C: the run stops at once, wherever it is (a step, a wait for data that does not
    come), and last.pt stays the one of the previous save. ``signum`` is the second signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


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
        on_step: called after every micro-batch as ``on_step(trainer)`` (progress hooks, tests).
        model: the network to train instead of the config's (:func:`teskd_fast.train.fit`): a TESKD network, or
            for ``method="baseline"`` the plain model; on ``env.device``.
        data: ``(train_loader, val_loader, num_classes)`` instead of the config's dataset: loaders with
            ``set_epoch(epoch, start_batch=...)`` and ``len`` (:class:`teskd_fast.train.api.EpochLoader`).
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, env: D.DistEnv, resume: dict | None = None,
                 on_step: Callable[[Trainer], None] | None = None, model: nn.Module | None = None,
                 data: tuple[Any, Any, int] | None = None):
        self.cfg, self.run_dir, self.env, self.on_step = cfg, Path(run_dir), env, on_step
        check_batches(cfg, env, resume)
        check_device_options(cfg, env)
        dev = env.device
        # The current CUDA device, cuDNN autotuning and TF32 matmuls, as the benchmarks measure them.
        self.backends = configure_backends(dev)
        self.precision = cfg.precision if cfg.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else dev.type == "cuda"
        self.compiled = use_compile(cfg, env)

        if data is None:
            check_dataset(cfg)
            data = build_data(cfg, env, self.channels_last)
        self.train_loader, self.val_loader, self.num_classes = data
        self.model = (model if model is not None else build_model(cfg, self.num_classes)).to(dev)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and env.distributed:
            self.model = D.convert_sync_batchnorm(self.model)
        self.raw_model = self.model
        # The feature term is a sum over the batch: weighted by the processes and the micro-batches of a step, so
        # that the step's loss is the global large batch's (optim.Accumulation divides every loss by accum_steps).
        self.criterion = build_criterion(cfg, env.world_size * cfg.accum_steps)
        self.mix = build_mix(cfg, env.rank)
        self.optimizer = build_optimizer(self.raw_model, cfg)
        self.params = list(self.raw_model.parameters())
        self.scaler = torch.amp.GradScaler(dev.type) if self.precision == "fp16" else None
        self.accum = Accumulation(cfg.accum_steps)
        batches = train_steps(self.train_loader, cfg, env)
        # Micro-batches per epoch (the loader's positions); the optimiser steps updates_per_epoch times.
        self.steps_per_epoch = self.accum.micro_batches(batches)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"the training set gives {batches} batch(es) of {cfg.batch_size // env.world_size} "
                              f"per process, fewer than --accum-steps {cfg.accum_steps}" if batches else
                              f"the training set gives no batch of {cfg.batch_size // env.world_size} per process")
        self.updates_per_epoch = self.accum.updates(batches)
        self.schedule = LRSchedule(cfg, self.updates_per_epoch)
        self.ema = TeacherEMA(self.raw_model, cfg.ema_decay) if cfg.ema_decay > 0 else None

        self.epoch, self.position, self.step = 0, 0, 0
        self.best = {"top1": -1.0, "epoch": 0}
        self.parts = list(BASELINE_PARTS if cfg.method == "baseline" else PARTS)
        self.acc = TrainAccumulator(self.parts, dev)
        self._epoch_elapsed = 0.0
        self._acc_state: dict[str, torch.Tensor] | None = None
        # The metrics row of every finished epoch.
        self.history: list[dict[str, Any]] = []
        if resume is not None:
            self._load(resume)

        forward_model = self.model
        if self.compiled:
            forward_model = self._compile(forward_model)
        if env.distributed:
            ids = [dev.index] if dev.type == "cuda" else None
            forward_model = nn.parallel.DistributedDataParallel(forward_model, device_ids=ids)
        if self.compiled:
            forward_model = EagerTails(forward_model, self.train_loader, self.val_loader)
        self.forward_model = forward_model
        self._stop_signal: int | None = None

    def _compile(self, model: nn.Module) -> nn.Module:
        # Static shapes: a batch of another size runs eagerly (EagerTails), compiling no graph of its own.
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
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "accumulator": self._acc_state if self.position else None,
            # Inside an accumulation: the gradients of its micro-batches so far (tensors in a list).
            "grads": grads_state(self.params) if self.accum.pending(self.position) else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch_elapsed": self._epoch_elapsed if self.position else 0.0,
            "best": dict(self.best),
            "metrics": list(self.history),
        }

    def _load(self, ckpt: dict[str, Any]) -> None:
        from teskd_fast.models.teskd import check_state_dict

        source = self.run_dir / "last.pt"
        saved_classes = ckpt.get("num_classes", self.num_classes)
        if saved_classes != self.num_classes:
            # The data changed (--data-dir may), not the checkpoint: a configuration error (exit status 2).
            raise ConfigError(f"{source} was trained on {saved_classes} classes; the {self.cfg.dataset} data in "
                              f"--data-dir {self.cfg.data_dir or './data'} has {self.num_classes}")
        try:
            check_state_dict(ckpt["model"], self.raw_model.state_dict(),
                             f"the model of its configuration ({self.cfg.arch}, width {self.cfg.width}, "
                             f"{self.cfg.method})")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source} does not fit the model: {e}") from None
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.position, self.step = ckpt["epoch"], ckpt["position"], ckpt["step"]
        self.best = dict(ckpt["best"])
        self.history = list(ckpt["metrics"])
        if self.position and ckpt.get("accumulator") is not None:
            # The saved sums are already reduced over the processes: rank 0 carries them, the others start at
            # zero, and the epoch's final all-reduce gives the same totals for any number of processes.
            if self.env.is_main:
                self.acc.load_state_dict(ckpt["accumulator"])
            self._epoch_elapsed = ckpt.get("epoch_elapsed", 0.0)
        if self.accum.pending(self.position):
            if ckpt.get("grads") is None:
                raise CheckpointError(f"{source} was saved inside a gradient accumulation without its gradients")
            load_grads_state(self.params, ckpt["grads"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise CheckpointError(f"{source} holds no EMA of the teacher (saved without --ema-decay)")
            self.ema.load_state_dict(ckpt["ema"])
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
        # The first signal only asks: the run stops after the step in flight, writing last.pt. A step waiting on
        # data that never comes (a hung file system, a stuck loader) would wait on: the second signal abandons it.
        if self._stop_signal is not None:
            raise Abandoned(signum)
        self._stop_signal = signum
        if self.env.is_main:
            name = signal.Signals(signum).name
            print(f"\nteskd-train: {name} received: finishing this step, then writing last.pt "
                  f"({name} or Ctrl-C again to abandon it)", flush=True)

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

    def train_step(self, images: torch.Tensor, target: torch.Tensor, step_tensor: torch.Tensor,
                   i: int | None = None) -> None:
        """One micro-batch (``i``-th of the epoch) on this process's batch: its gradient is added, and after the
        last micro-batch of an accumulation (every one with ``--accum-steps 1``) the optimiser steps, clipping
        first with ``--clip-grad``, and the teacher's EMA follows. The loss and its parts are summed on the
        device, unscaled."""
        i = self.position if i is None else i
        with self._autocast():
            out = self.forward_model(images)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            loss, parts = self.criterion(out, target)
        scaled = loss * self.accum.scale if self.accum.steps > 1 else loss
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if self.accum.is_step(i):
            optimizer_step(self.optimizer, self.scaler, self.params, self.cfg.clip_grad)
            if self.ema is not None:
                self.ema.update(self.epoch * self.updates_per_epoch + (i + 1) // self.accum.steps)
        self.acc.update(step_tensor, loss, parts, logits, labels(target))

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
        # Every Loader draws the epoch's order and augmentation from (seed, epoch) and starts at any batch.
        loader.set_epoch(self.epoch, start_batch=start)
        steps = self.steps_per_epoch
        first_step = self.epoch * steps
        step_ids = torch.arange(first_step, first_step + steps, device=dev)
        reader = LaggedReader(dev)
        bar = None
        if cfg.progress and self.env.is_main:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (a log file gets the line per epoch alone).
            bar = tqdm(total=steps, initial=start, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                       dynamic_ncols=True, disable=None)
        t0 = time.perf_counter()
        images_done = 0
        i = start
        try:
            for batch in loader:
                images, target = self.mix(*batch, self.epoch, i)
                self._set_lr(self.schedule(self.epoch, i // self.accum.steps))
                self.train_step(images, target, step_ids[i], i)
                i += 1
                self.step += 1
                self.position = i
                images_done += images.shape[0]
                if self.on_step is not None:
                    self.on_step(self)
                if i % cfg.log_every == 0 or i == steps:
                    reader.push(torch.cat([self.acc.sums[:1], self.acc.sums[-1:], self.acc.first_bad.double()]))
                    latest = reader.latest()
                    if latest is not None:
                        # A non-finite step seen early: stop now (one process alone must not leave a DDP job,
                        # which instead stops at the epoch's end, where the marker is reduced).
                        if min(latest[2:]) < NO_STEP and not self.env.distributed:
                            break
                        if bar is not None:
                            rate = images_done * self.env.world_size / max(time.perf_counter() - t0, 1e-9)
                            bar.set_postfix(loss=f"{latest[0] / max(latest[1], 1):.4f}", img_s=f"{rate:.0f}")
                    if bar is not None:
                        bar.update(i - bar.n)
                # Stop at --steps-per-epoch without fetching one more batch (whose images might not even decode).
                if i >= steps or self._should_stop(i):
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
            self._acc_state = {"sums": sums.cpu(), "first_bad": bad.cpu(), "world_size": self.env.world_size}
            self.save()
            name = signal.Signals(signum).name
            raise Interrupted(
                f"teskd-train: stopped by {name} at epoch {self.epoch + 1}, batch {self.position}/{steps}; "
                f"last.pt written. Continue with: teskd-train --resume {self.run_dir}", signum)
        metrics["lr"] = self.schedule(self.epoch, self.updates_per_epoch - 1)
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
                acc = EvalAccumulator(head_names(len(heads) - 1, getattr(self.raw_model, "student_levels", None)),
                                      self.env.device)
            acc.update(heads, target)
        if acc is None:
            raise RuntimeError("the validation loader gave no batch")
        vec = D.all_reduce(acc.packed(), self.env, "sum")
        metrics = acc.unpack(vec.tolist())
        if self.ema is not None:
            metrics.update(self.evaluate_ema(loader))
        return metrics

    @torch.no_grad()
    def evaluate_ema(self, loader=None) -> dict[str, float]:
        """The EMA teacher's top-1 / top-5 and loss on the validation set: ``val_top1_teacher_ema``, ..."""
        loader = loader if loader is not None else self.val_loader
        acc = EvalAccumulator(["teacher"], self.env.device)
        for images, target in loader:
            with self._autocast():
                logits = self.ema.teacher_forward(images)
            acc.update([logits], target)
        out = acc.unpack(D.all_reduce(acc.packed(), self.env, "sum").tolist())
        return {"val_top1_teacher_ema": out["val_top1_teacher"], "val_top5_teacher_ema": out["val_top5_teacher"],
                "val_loss_teacher_ema": out["val_loss_teacher"]}

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.epochs``, evaluating, logging and checkpointing every epoch; return the summary."""
        cfg = self.cfg
        log = None
        if self.env.is_main:
            # The files get exactly the checkpoint's rows.
            log = MetricsLog(self.run_dir, tensorboard=cfg.tensorboard, rows=self.history)
            self.history = list(log.rows)
            repair_best(self.run_dir, self.epoch, self.position, self.best)
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
                    if log is not None:
                        # In the checkpoint first: a process killed before log.log leaves the row in last.pt,
                        # and the resumed run writes it to the files.
                        self.history.append(row)
                    self.save(best=is_best)
                    if log is not None:
                        log.log(row)
                        print(report.format_epoch(row, self.parts, cfg.epochs), flush=True)
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

    def finish(self) -> dict[str, Any]:
        """Write teacher.pt (and teacher.json), curves.png, then summary.json; print every head's accuracy.

        summary.json comes last and lists the files written before it: a run is finished when it and they exist
        (a kill before it leaves a run that ``--resume`` finishes without training)."""
        if not self.env.is_main:
            return {}
        summary = report.summarize(read_metrics(self.run_dir), self.cfg, self.epoch, self.best, self.num_classes)
        self.export_teacher()
        if self.cfg.plot:
            report.plot_curves(self.run_dir)
        summary["outputs"] = [name for name in report.OUTPUTS if (self.run_dir / name).is_file()]
        report.write_summary(summary, self.run_dir)
        report.print_summary(summary, self.run_dir)
        return summary

    def export_teacher(self) -> Path:
        """RUN_DIR/teacher.pt: the plain teacher's state_dict (the raw teacher's, or with ``--export ema`` its
        EMA's); teacher.json says how to build it."""
        model = self.ema.module if self.cfg.export == "ema" and self.ema is not None else self.raw_model
        return report.export_teacher(model, self.cfg, self.num_classes, self.run_dir)
