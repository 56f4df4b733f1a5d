"""``teskd-train``: train TESKD (or its same-recipe baseline) from a preset, a YAML file and flags.

Examples::

    teskd-train                                          # the built-in digits demo, CPU, about a minute
    teskd-train --preset cifar100-resnet18 --data-dir data/
    teskd-train --preset cifar100-resnet18 --method baseline --data-dir data/
    teskd-train --resume runs/cifar100-resnet18-teskd-20250101-120000 [--epochs 300]
    torchrun --nproc_per_node 8 -m teskd_fast.train --preset imagenet-resnet18 --data-dir /imagenet
    teskd-train --eval-only runs/.../best.pt

A run folder is used by one training process at a time (:mod:`.runfolder`): a second run on it is refused. A
resume continues the same run: a last.pt of another run, or a flag that changes what the run computes (any but
those in :data:`teskd_fast.train.config.CHANGEABLE_AT_RESUME`), is refused before any work.

Exit status (:mod:`.exit_status`; every failure prints one ``teskd-train: ...`` line naming the file, folder or flag;
no traceback):

- 0: done.
- 1: missing or unusable data, or an unusable checkpoint: a dataset (any :class:`teskd_fast.data.DatasetError`,
  whether the check before the run or a loader during it found it, e.g. an image that cannot be decoded: last.pt
  then holds the last finished epoch), or a checkpoint that is missing, corrupt, of another kind (``--eval-only``
  takes a teskd-train checkpoint or a teacher.pt / teacher.safetensors state_dict, or a run folder for its best.pt),
  refused because loading it would run code (:mod:`teskd_fast.serialization`: last.pt, best.pt, the --eval-only
  file) or that does not fit the network.
- 2: a bad flag or configuration, found before any work: an unknown or invalid value (of a flag, or of a
  ``--config`` file's key, named as that key; an ``--init`` file missing, empty, refused as above, or not the
  teacher's weights included), an ``--arch`` that ``wrap()`` refuses or that cannot run at the run's image size,
  ``--loader nvjpeg`` without CUDA or ``--loader dali`` without DALI, an ``--out`` folder that cannot be created or
  written, a resume that would change the run, a run folder in use by another run or already holding one (a
  last.pt; a folder a run left before its first checkpoint is reused by the same command).
- 3: a non-finite loss.
- 4: the run could not go on for a reason outside it: a write to the run folder failed (the disk is full, a
  quota, an I/O error; last.pt then holds the last saved state), or this process could not join its torchrun
  process group (the peers unreachable, or not there within ``TESKD_FAST_DIST_TIMEOUT`` seconds).
- 128 + signal number: stopped by SIGTERM / Ctrl-C (after writing last.pt).

A run that stops before training starts (exit 1 or 2) leaves no run folder behind: it is created once the data
and the network are built.

Elastic restarts: when ``torchrun --max-restarts N`` restarts a failed worker group, each worker runs the same
command line again. Under torchrun, an ``--out`` folder that holds a last.pt is resumed exactly as ``--resume``
would, with the same checks (another run's last.pt is refused, exit 2), whatever this node's
``TORCHELASTIC_RESTART_COUNT``, so that all nodes of a group decide alike; without ``--out`` (a default folder is
named after its start time) a restarted group cannot find its run and is refused (exit 2).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from teskd_fast.train.archs import timm_name
from teskd_fast.train.config import ConfigError, TrainConfig, build_parser, check_files, load_yaml, resolve
from teskd_fast.train.exit_status import CONFIG, DATA, DONE, INTERRUPTED, NONFINITE, OUTSIDE, stopped_by
from teskd_fast.train.runfolder import RunFolderRefused


def _write_config(cfg: TrainConfig, run_dir: Path) -> None:
    import yaml

    from teskd_fast.train.checkpoint import atomic_write_text

    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _default_out(cfg: TrainConfig) -> Path:
    name = cfg.preset if cfg.preset != "none" else cfg.dataset
    return Path("runs") / f"{name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


# (config, checkpoint to resume from or evaluate, run folder)
_Resolved = tuple[TrainConfig, dict[str, Any] | None, Path]


def _resolve_args(argv: list[str] | None, held: contextlib.ExitStack) -> _Resolved:
    """Parse the command line into (config, checkpoint to resume from or evaluate, run folder).

    A resume locks its run folder first (rank 0); ``held`` releases the lock when the command ends.
    """
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    # field -> how a message names it: a YAML file's key (a flag given too overrides it, and is named as a flag).
    origin: dict[str, str] = {}
    try:
        overrides = load_yaml(given.pop("config"), origin) if "config" in given else {}
        overrides.update(given)
        origin = {k: v for k, v in origin.items() if k not in given}
        if overrides.get("resume") and overrides.get("eval_only"):
            raise ConfigError("--resume and --eval-only cannot be combined")
        if overrides.get("resume"):
            return _resume_config(overrides, held, origin)
        if overrides.get("eval_only"):
            return _eval_config(overrides)
        if _restarted_run(overrides):
            return _resume_config({**overrides, "resume": overrides["out"]}, held)
        cfg = resolve(overrides, origin=origin)
        check_files(cfg, origin)
        return cfg, None, Path(cfg.out) if cfg.out else _default_out(cfg)
    except RunFolderRefused as e:
        # Not a misspelt flag: the message alone, without the usage text.
        print(f"teskd-train: error: {e}", file=sys.stderr)
        raise SystemExit(CONFIG) from None
    except ConfigError as e:
        # One line (argparse's usage text is 40 lines of flags above it, and the value is named already).
        print(f"teskd-train: error: {e}", file=sys.stderr)
        raise SystemExit(CONFIG) from None
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # A missing or foreign checkpoint for --resume / --eval-only.
        print(f"teskd-train: {e}", file=sys.stderr)
        raise SystemExit(DATA) from None
    except OSError as e:
        # The resumed folder's lock file cannot be written (a full disk): nothing has run.
        print(f"teskd-train: {_os_error_message(e, Path(overrides.get('resume') or '.'))}", file=sys.stderr)
        raise SystemExit(OUTSIDE) from None


def _restarted_run(overrides: dict[str, Any]) -> bool:
    """True when torchrun runs this command and its ``--out`` folder holds a last.pt: an earlier attempt's (a
    restarted worker group), which the run resumes; :func:`_resume_config` refuses it when it is another run's.

    Every node decides from the run folder and the command line alone, which all nodes share, not from its own
    ``TORCHELASTIC_RESTART_COUNT``: in a multi-node job a node whose agent did not restart (or joined anew) has
    count 0 while its peers resume. No attempt of this job can have written the last.pt it finds: the processes
    all pass here before the process group forms, and no step runs before it does.
    """
    from teskd_fast.train.distributed import launch_rank

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        return False  # not under torchrun
    if not overrides.get("out"):
        if restart.isdigit() and int(restart) > 0:
            raise RunFolderRefused(f"torchrun restarted the workers (TORCHELASTIC_RESTART_COUNT={restart}), but "
                                   "without --out the first attempt's run folder cannot be found (its name holds "
                                   "its start time): resume it with --resume RUN_DIR, and give --out to jobs that "
                                   "may restart")
        return False
    if not (Path(overrides["out"]) / "last.pt").is_file():
        return False  # nothing saved yet: the run starts again
    if launch_rank() == 0:
        print(f"teskd-train: under torchrun (restart {restart} of this node), {overrides['out']} holds a last.pt: "
              "resuming from it", file=sys.stderr, flush=True)
    return True


def _resume_config(overrides: dict[str, Any], held: contextlib.ExitStack, origin: dict[str, str] | None = None) \
        -> _Resolved:
    """Config for --resume: the checkpoint's, with the flags a resume may change; the folder locked first."""
    from teskd_fast.train.checkpoint import load_resume
    from teskd_fast.train.distributed import launch_rank
    from teskd_fast.train.runfolder import RunLock, check_resume

    run_dir = Path(overrides["resume"])
    if overrides.get("out") and Path(overrides["out"]).resolve() != run_dir.resolve():
        raise RunFolderRefused(f"--out {overrides['out']} with --resume {run_dir}: a resumed run stays in its "
                               "folder; drop --out")
    lock = None
    if run_dir.is_dir() and launch_rank() == 0:
        # Before reading anything: a run that is writing there is refused by name, not by what it has written.
        lock = held.enter_context(RunLock(run_dir))
    ckpt = load_resume(run_dir)
    cfg = resolve({**overrides, "out": str(run_dir), "resume": str(run_dir)}, base=ckpt["config"], origin=origin)
    check_resume(run_dir, ckpt, cfg)
    if lock is not None:
        lock.remove_stale_temporaries()
    return cfg, ckpt, run_dir


def _eval_config(overrides: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any], Path]:
    """Config for --eval-only: from a training checkpoint's config, or from the metadata of a teacher.safetensors
    or the teacher.json beside a teacher.pt. A run folder stands for its best.pt (:func:`weights_path`)."""
    from teskd_fast.train.checkpoint import CHECKPOINT_FORMAT, read_weights, weights_path

    path = weights_path(overrides["eval_only"], "--eval-only")
    if path != Path(overrides["eval_only"]).expanduser():
        print(f"teskd-train: --eval-only {overrides['eval_only']}: a run folder: its {path.name}", file=sys.stderr)
        overrides = {**overrides, "eval_only": str(path)}
    ckpt, metadata = read_weights(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        # A resumed run's checkpoint records its --resume: evaluating it is not resuming it.
        cfg = resolve(overrides, base={**ckpt["config"], "resume": ""})
        return cfg, ckpt, path.parent
    if not _is_state_dict(ckpt):
        raise ValueError(f"--eval-only {path}: expected a teskd-train checkpoint (last.pt, best.pt) or a teacher.pt "
                         f"state_dict (a dict of tensors); the file holds {_describe(ckpt)}")
    info_path = path.with_suffix(".json")
    base: dict[str, Any] = {k: metadata[k] for k in ("arch", "stem") if k in metadata}
    if "width" in metadata:
        base["width"] = float(metadata["width"])
    if not base and info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except ValueError as e:
            raise ValueError(f"--eval-only {path}: {info_path} (how to build the teacher) is not JSON: {e}") from e
        base = {k: info[k] for k in ("arch", "stem", "width") if k in info}
    config_yaml = path.parent / "config.yaml"
    if base and config_yaml.is_file():
        base = {**load_yaml(str(config_yaml)), **base}
    cfg = resolve({**base, **overrides, "method": "baseline"})
    return cfg, {"teacher_state_dict": ckpt}, path.parent


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _describe(obj: Any) -> str:
    """What an unpickled object is, in a few words (for the message about a file of the wrong kind)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        return f"a dict with keys {keys[:5]}" + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def _check_run_folder(run_dir: Path) -> None:
    """Refuse, before any work, a run folder that cannot be created or written (ConfigError naming it)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise ConfigError(f"--out {run_dir}: the run folder cannot be created or written ({problem}); choose another "
                      "with --out")


def _holds_a_run(run_dir: Path) -> bool:
    """True (and says so) when a new run's folder already holds another run's last.pt."""
    if not (run_dir / "last.pt").exists():
        return False
    print(f"teskd-train: {run_dir} already holds a run; continue it with --resume {run_dir} or choose another "
          "--out", file=sys.stderr)
    return True


def _folder_error(run_dir: Path, e: OSError) -> ConfigError:
    return ConfigError(f"--out {run_dir}: the run folder cannot be created or written ({e.strerror or e}); choose "
                       "another with --out")


def _make_run_folder(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _folder_error(run_dir, e) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``teskd-train`` and ``python -m teskd_fast.train``; returns the exit status."""
    # Holds the run folder's lock until the command returns.
    with contextlib.ExitStack() as held:
        cfg, ckpt, run_dir = _resolve_args(argv, held)
        import torch

        threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            return _run(cfg, ckpt, run_dir, held)
        finally:
            torch.set_num_threads(threads)


def _run(cfg: TrainConfig, ckpt: dict[str, Any] | None, run_dir: Path, held: contextlib.ExitStack) -> int:
    from teskd_fast.data import DatasetError
    from teskd_fast.train import distributed as D
    from teskd_fast.train.checkpoint import CheckpointError
    from teskd_fast.train.runfolder import RunLock
    from teskd_fast.train.trainer import Abandoned, Interrupted, NonFiniteLoss, Trainer

    try:
        if not cfg.eval_only and not cfg.resume:
            _check_run_folder(run_dir)
    except ConfigError as e:
        print(f"teskd-train: error: {e}", file=sys.stderr)
        return CONFIG
    try:
        env = D.setup(cfg.device)
    except D.DistributedSetupError as e:
        print(f"teskd-train: {e}", file=sys.stderr)
        return OUTSIDE
    except RuntimeError as e:
        print(f"teskd-train: {e}", file=sys.stderr)
        return CONFIG
    trainer = None
    try:
        if cfg.eval_only:
            return _evaluate_only(cfg, ckpt, run_dir, env)
        new_run = env.is_main and not cfg.resume  # (a resume locked its folder before reading it: _resolve_args)
        lock = None
        if new_run and run_dir.is_dir():
            # An existing folder: refused now if another run holds it (naming that run) or has saved there.
            lock = held.enter_context(RunLock(run_dir))
            if _holds_a_run(run_dir):
                return CONFIG
        # A new run folder is made once the data and the network are built: a run that cannot start leaves none.
        trainer = Trainer(cfg, run_dir, env, resume=ckpt)
        cost = _print_cost(trainer.raw_model, cfg) if env.is_main else None
        if cfg.dry_run:
            return DONE
        if new_run:
            if lock is None:
                _make_run_folder(run_dir)
                lock = held.enter_context(RunLock(run_dir))
                if _holds_a_run(run_dir):  # another run started there meanwhile and saved
                    return CONFIG
            lock.remove_stale_temporaries()
        if env.is_main:
            try:
                _write_config(cfg, run_dir)
                if cost is not None:
                    from teskd_fast.train.checkpoint import atomic_write_text

                    atomic_write_text(run_dir / "cost.json", json.dumps(cost, indent=2) + "\n")
            except OSError as e:
                raise _folder_error(run_dir, e) from None
        D.barrier(env)
        if env.is_main:
            print(_start_line(cfg, trainer, env, run_dir, ckpt), flush=True)
        trainer.fit()
        return DONE
    except DatasetError as e:
        # Whatever only reading the data reveals (an empty class folder, a missing or corrupt CIFAR file, an
        # undecodable image): the data package's message, no traceback. A run stopped by it keeps the last.pt
        # of its last finished epoch (nothing is saved mid-epoch here). The Trainer checks that the dataset is
        # there before it builds anything: an error then (no trainer yet) says nothing about last.pt.
        last = run_dir / "last.pt"
        saved = f"; {last} holds the last saved state" if trainer is not None and last.exists() else ""
        print(f"teskd-train: {e}{saved}", file=sys.stderr)
        return DATA
    except (CheckpointError, ConfigError, NonFiniteLoss) as e:
        # An unusable checkpoint 1, a configuration only the built run reveals 2, a non-finite loss 3.
        status = CONFIG if isinstance(e, ConfigError) else NONFINITE if isinstance(e, NonFiniteLoss) else DATA
        print(f"teskd-train: {'error: ' if status == CONFIG else ''}{e}", file=sys.stderr)
        return status
    except Interrupted as e:
        if env.is_main:
            print(str(e), file=sys.stderr)
        return stopped_by(e.signum)
    except OSError as e:
        # A write to the run folder failed (checkpoints, metrics, exports: the data's errors are DatasetErrors).
        last = run_dir / "last.pt"
        saved = f"; {last} holds the last saved state" if not cfg.eval_only and last.exists() else ""
        print(f"teskd-train: {_os_error_message(e, run_dir)}{saved}", file=sys.stderr)
        return OUTSIDE
    except KeyboardInterrupt as e:
        # A second SIGTERM or Ctrl-C (trainer.Abandoned), or a Ctrl-C before the trainer's handler: the step in
        # flight, or the wait for its data, is abandoned and last.pt is the one of the previous save.
        last = run_dir / "last.pt"
        saved = f"; {last} holds the last saved state" if not cfg.eval_only and last.exists() else ""
        print(f"\nteskd-train: abandoned{saved}", file=sys.stderr)
        return stopped_by(e.signum) if isinstance(e, Abandoned) else INTERRUPTED
    finally:
        # The DDP wrapper holds the process group. Drop the trainer here so that cleanup() destroys both while
        # the interpreter is alive: left to the exit, gloo's threads could abort a finished rank (see cleanup).
        trainer = None
        D.cleanup()


def _start_line(cfg: TrainConfig, trainer, env, run_dir: Path, ckpt: dict[str, Any] | None) -> str:
    """What a user checks at a glance before a run goes on: the data, the network, the recipe, where it runs. The
    values a folder's images gave (:func:`teskd_fast.train.config.folder_defaults`) come first, one line each."""
    notes = "".join(f"teskd-train: from the data: {note}\n" for note in getattr(cfg, "notes", ()))
    what = "resuming" if ckpt else "training"
    at = f" from epoch {trainer.epoch + 1}, batch {trainer.position}" if ckpt else ""
    loader = trainer.train_loader
    images = getattr(loader, "num_images", None)
    if images is None and hasattr(loader, "index"):
        images = len(loader.index.samples)
    images = f"{images} training images" if images is not None else "training images"
    # CIFAR's loader keeps its 32 px images; progressive resizing ramps from image_size_start.
    size = 32 if cfg.dataset.startswith("cifar") else cfg.image_size
    size = f"{cfg.image_size_start}->{size}" if cfg.image_size_start else size
    net = cfg.arch if timm_name(cfg.arch) else f"{cfg.arch} (stem {cfg.stem}, width {cfg.width:g})"
    preset = f", preset {cfg.preset}" if cfg.preset != "none" else ""
    return (f"{notes}teskd-train: {what} {cfg.method} {net} on {cfg.dataset}: {images}, {trainer.num_classes} "
            f"classes, image size {size}{at} | {cfg.epochs} epochs, global batch {cfg.batch_size} over "
            f"{env.world_size} process(es), lr {cfg.lr:g} ({cfg.schedule}){preset} | device {env.device}, precision "
            f"{trainer.precision}, compile {'on' if trainer.compiled else 'off'} | run folder {run_dir}")


def _print_cost(model: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Print the cost line (and the warning, when the students cost more than the limit); return the report."""
    from teskd_fast.models.cost import cost_report

    report = cost_report(model, cfg.image_size)
    print(f"teskd-train: {report['line']}", flush=True)
    if report["warning"]:
        print(f"teskd-train: warning: {cfg.arch}: {report['warning']}", file=sys.stderr, flush=True)
    return report


def _os_error_message(e: OSError, run_dir: Path) -> str:
    """One line for a failed write: the file (or the run folder), the reason, and a full disk said so."""
    what = e.strerror or str(e)
    if e.filename and str(e.filename) not in what:
        what = f"{e.filename}: {what}"
    elif not e.filename:
        what = f"a write in the run folder {run_dir} failed: {what}"
    return what + (" (the disk is full)" if e.errno == errno.ENOSPC else "")


def _evaluate_only(cfg: TrainConfig, ckpt: dict[str, Any], run_dir: Path, env) -> int:
    from teskd_fast.models.teskd import check_state_dict
    from teskd_fast.train.report import print_evaluation
    from teskd_fast.train.trainer import Trainer

    # Only the weights matter here: a teacher.pt state_dict, or the model entry of a training checkpoint.
    teacher_sd = "format" not in ckpt
    state = ckpt["teacher_state_dict"] if teacher_sd else ckpt.get("model")
    trainer = Trainer(cfg, run_dir, env)
    what = "teacher" if cfg.method == "baseline" else "TESKD network"
    # --stem and --width shape the ResNets only: a timm model is named by --arch alone.
    timm = cfg.arch.startswith("timm/")
    shape = "" if timm else f"--stem {cfg.stem}, --width {cfg.width:g}, "
    target = f"the {cfg.arch} {what} ({shape}{trainer.num_classes} classes)"
    try:
        check_state_dict(state, trainer.raw_model.state_dict(), target)
    except (TypeError, ValueError) as e:
        flags = "--arch" if timm else "--arch / --stem / --width"
        hint = (f"the teacher.json written beside a teacher.pt, or {flags}, say which network it is"
                if teacher_sd else "a training checkpoint fits the flags it was trained with")
        print(f"teskd-train: --eval-only {cfg.eval_only}: {e} ({hint})", file=sys.stderr)
        return DATA
    trainer.raw_model.load_state_dict(state)
    # The EMA teacher is evaluated too when the checkpoint holds one (a training checkpoint of an --ema-decay run).
    if trainer.ema is not None and not teacher_sd and ckpt.get("ema") is not None:
        trainer.ema.load_state_dict(ckpt["ema"])
    else:
        trainer.ema = None
    metrics = trainer.evaluate()
    if env.is_main:
        print_evaluation(metrics, cfg.eval_only, cfg.dataset, trainer.num_classes)
    return DONE


if __name__ == "__main__":
    sys.exit(main())
