"""The run folder: one training process at a time, and what a resume may take from it.

Lock. A training run holds an exclusive advisory lock (``fcntl.flock``) on ``RUN_DIR/.lock`` for its whole
life: a second ``teskd-train`` on the same folder, with ``--out`` or ``--resume``, is refused with the folder
and the holder's pid and host, which the holder writes into the file. Only rank 0 of a DDP job takes it;
``--eval-only`` does not (it only reads). The kernel drops the lock when the process ends, however it ends
(SIGKILL included), so a folder left by a killed run is free again. The lock file is never deleted: deleting
it would let a waiting process lock the deleted file while a third locks a new one. Processes forked while
the lock is held (data-loader workers) close their copy at once, so only the run's own process holds it.
Without ``fcntl`` (Windows), or on a filesystem that refuses ``flock``, no lock is taken and a warning says
so; the folder is then not protected against a second run.

Resume. A resume continues the run that ``RUN_DIR/config.yaml`` describes, from ``RUN_DIR/last.pt``: a
checkpoint whose configuration differs from config.yaml (one copied from another run) is refused, and so is a
flag that changes a field outside :data:`teskd_fast.train.config.CHANGEABLE_AT_RESUME`. Both refusals name
each field with its two values.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from teskd_fast.train.config import CHANGEABLE_AT_RESUME, ConfigError, TrainConfig, config_differences

try:
    import fcntl
except ImportError:
    fcntl = None

LOCK_NAME = ".lock"
# The files a run writes atomically, whose temporary files a killed write may leave.
ATOMIC_FILES = ("last.pt", "best.pt", "teacher.pt", "teacher.safetensors", "config.yaml", "summary.json",
                "teacher.json")
# Fields that name the run folder or the command's mode: a resume sets them itself.
_WHERE = frozenset({"out", "resume", "eval_only"})

# Lock descriptors of this process: a forked child closes them (see the module docstring).
_held_fds: set[int] = set()


def _close_in_child() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunFolderRefused(ConfigError):
    """The run folder cannot be used so: it is in use, or a resume would not continue its run (exit status 2)."""


class RunFolderBusy(RunFolderRefused):
    """Another live process holds the run folder's lock; the message names the folder and that process."""


class RunLock:
    """The run folder's lock, held from ``__enter__`` (or :meth:`acquire`) to ``__exit__`` (or :meth:`release`).

    Args:
        run_dir: an existing run folder.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunFolderBusy` naming the process that holds it (never waits)."""
        if fcntl is None:
            print(f"teskd-train: warning: no file locks on this platform; nothing stops a second run in "
                  f"{self.run_dir}", file=sys.stderr)
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot create the lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "a process that is starting"
            raise RunFolderBusy(f"{self.run_dir} is in use by another teskd-train run ({who}); wait for it to end or "
                                "stop it, or choose another --out") from None
        except OSError as e:
            os.close(fd)
            print(f"teskd-train: warning: cannot lock {self.path} ({e.strerror}); nothing stops a second run in "
                  f"{self.run_dir}", file=sys.stderr)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        _held_fds.add(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _held_fds.discard(fd)
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)

    def remove_stale_temporaries(self) -> None:
        """Delete the temporary files that killed writes left in the folder (only while the lock is held)."""
        # Imported here: the command's argument parsing needs this module, not torch.
        from teskd_fast.train.checkpoint import remove_stale_temporaries

        if not self.held:
            return
        # Nobody else writes here now: every temporary file is a dead write's.
        for tmp in remove_stale_temporaries(self.run_dir, ATOMIC_FILES):
            print(f"teskd-train: removed {tmp}, left by an interrupted write", file=sys.stderr)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration (a run's config.yaml, a checkpoint's, a comparison's record) with every field: one
    written before a field existed lacks it, and ran with its default value."""
    return {**TrainConfig().to_dict(), **config}


def read_config_yaml(path: Path) -> dict[str, Any]:
    """A stored config.yaml as a mapping; RuntimeError naming the file when it cannot be read or is not one."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RuntimeError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise RuntimeError(f"{path} is not a mapping of field: value")
    return data


def check_resume(run_dir: Path, ckpt: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse a resume that would not continue the run of ``run_dir`` (raises :class:`RunFolderRefused`).

    Args:
        run_dir: the folder given to ``--resume``.
        ckpt: its last.pt.
        cfg: the configuration the resumed run would have: the checkpoint's, with the flags and YAML given.
    """
    fixed = _WHERE | CHANGEABLE_AT_RESUME
    stored = complete_config(ckpt["config"])
    config_yaml = run_dir / "config.yaml"
    if config_yaml.is_file():
        diffs = config_differences(complete_config(read_config_yaml(config_yaml)), stored, fixed)
        if diffs:
            raise RunFolderRefused(
                f"--resume {run_dir}: {run_dir / 'last.pt'} is not the checkpoint of the run in {config_yaml} (a "
                "last.pt of another run?); the fields that differ (config.yaml -> last.pt): " + "; ".join(diffs))
    diffs = config_differences(stored, cfg.to_dict(), fixed)
    if diffs:
        changeable = ", ".join("--" + n.replace("_", "-") for n in sorted(CHANGEABLE_AT_RESUME))
        raise RunFolderRefused(
            f"--resume {run_dir}: these fields would change what the run computes, so a resume cannot change "
            f"them (the run's -> given): {'; '.join(diffs)}. A resume may change only {changeable}; train with "
            "the new values in a new folder (--out).")
    done = ckpt["epoch"] + (1 if ckpt.get("position") else 0)
    if cfg.epochs < done:
        inside = f" and is inside epoch {done}" if ckpt.get("position") else ""
        raise RunFolderRefused(f"--epochs {cfg.epochs}: the run in {run_dir} has finished {ckpt['epoch']} "
                               f"epochs{inside}; give --epochs {done} or more")
