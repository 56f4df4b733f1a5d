"""Atomic checkpoints, the random-number-generator states an exact resume needs, and the run's last.pt.

A training checkpoint (``last.pt``, ``best.pt``) is a dict with ``"format": CHECKPOINT_FORMAT``; its other keys
are written by :meth:`teskd_fast.train.trainer.Trainer.state`. Keys a loader does not know are ignored.

A checkpoint holds only tensors, numbers, strings, lists and dicts (the NumPy RNG state too, see
:func:`rng_state`), and is read with PyTorch's restricted unpickler (:func:`teskd_fast.serialization.load_torch`):
loading one never runs code. Those of teskd_fast 0.1, whose NumPy RNG state is a NumPy array, load through that
reader's allow-list and resume exactly too.

Every atomic write goes through a temporary file ``.NAME.<random>.tmp`` in the destination's folder. A process
killed during a write leaves that file behind; :func:`remove_stale_temporaries` deletes them when the next run
has locked the folder.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from teskd_fast.serialization import UnsafeFileError, load_torch

CHECKPOINT_FORMAT = "teskd_fast.train/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is (corrupt, or its weights do not fit the model); the message says
    why."""


def _temporary(path: Path) -> tuple[int, str]:
    # The one naming of temporary files, which remove_stale_temporaries matches. mkstemp makes them 0600: they get
    # the mode open() would give (0666 less the umask), as metrics.csv has.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def _umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """``write(f)`` into a temporary binary file in ``path``'s folder, flushed to disk, then renamed over ``path``.

    A process killed at any moment leaves either the previous file or the new one, never a partial file; a failed
    write (KeyboardInterrupt included) leaves no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is None:
            raise
        # torch.save reports a failed write as its own RuntimeError, the OSError (a full disk) in its chain.
        raise OSError(cause.errno, f"cannot write {path}: {cause.strerror or cause}", str(path)) from None
    _fsync_dir(path.parent)


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError in ``e``'s chain (itself, its cause or context), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`_atomic_write`).

    Args:
        obj: anything ``torch.save`` takes.
        path: the destination.
    """
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` atomically (``best.pt`` from ``last.pt``)."""
    def copy(f):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)

    _atomic_write(dst, copy)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (config.yaml, a report) atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (teacher.safetensors)."""
    _atomic_write(path, lambda f: f.write(data))


def remove_stale_temporaries(folder: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files that writes of ``names`` killed mid-way left in ``folder``; returns them.

    Only call it while no other process writes there (a run calls it once it holds the run folder's lock):
    a live write's temporary file matches too.

    Args:
        folder: the folder written to.
        names: the destinations' file names (``"last.pt"`` matches ``.last.pt.<random>.tmp``).
    """
    removed = []
    for name in names:
        for tmp in sorted(Path(folder).glob(f".{name}.*.tmp")):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def _fsync_dir(folder: Path) -> None:
    # Persist the rename itself; not possible on every platform (Windows), where it is skipped.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save`, with a clear error for a missing or corrupt file.

    ``torch.save`` writes a zip archive whose members carry CRC-32 checksums that ``torch.load`` does not check: a
    flipped bit in a tensor loads as a wrong weight, one in the pickled structure as anything from a
    ``TypeError`` to an unknown class. So the checksums are checked first (one read of the file); a file that
    fails them, or that cannot be unpickled, is a :class:`CheckpointError` naming it. The file is read with the
    restricted unpickler (:func:`teskd_fast.serialization.load_torch`): one that would need to build another type
    (loading it could run code) is a :class:`CheckpointError` naming the file and that type.

    Args:
        path: the checkpoint file.
        map_location: as for ``torch.load``.

    Returns:
        the checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_archive(path)
    try:
        return load_torch(path, map_location=map_location)
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # a corrupt pickle raises almost any exception type
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint ({_first_line(e)})") from None


# The files of a run folder that hold weights, in the order a folder given for a file is read: for evaluation
# (--eval-only RUN_DIR) the best epoch's checkpoint first, which evaluates every head; for the teacher alone
# (--init RUN_DIR, teskd_fast.load_teacher(RUN_DIR)) the teacher a finished run exported first.
RUN_CHECKPOINTS = ("best.pt", "last.pt", "teacher.safetensors", "teacher.pt")
RUN_TEACHER = ("teacher.safetensors", "teacher.pt", "best.pt", "last.pt")


def weights_path(path: str | os.PathLike, flag: str, order: tuple[str, ...] = RUN_CHECKPOINTS) -> Path:
    """``path`` when it is a file; for a folder (a run folder), the first file of ``order`` it holds.

    Raises:
        FileNotFoundError: nothing there, or a folder without any of those files (the message says which, and
            begins with ``flag``).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for name in order:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{flag} {path}: a folder that holds none of {', '.join(order)}; give the weights "
                                "file itself")
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no such file: {path}")
    return path


def read_weights(path: str | os.PathLike) -> tuple[Any, dict[str, str]]:
    """``(object, metadata)`` of a weights file: a ``.safetensors`` file's tensors and metadata, or a torch file's
    object (a state_dict, a checkpoint) and ``{}``; nothing in either is run.

    Raises:
        CheckpointError: an empty, corrupt or unreadable file, or one that would need the full unpickler (named
            with the type it holds).
    """
    from teskd_fast.serialization import is_safetensors, load_safetensors

    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a copy or a save cut short; use another file")
    if is_safetensors(path):
        try:
            return load_safetensors(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return load_checkpoint(path), {}


def _check_archive(path: Path) -> None:
    """Raise :class:`CheckpointError` when ``path`` is a zip archive (torch's format) failing its own checks."""
    try:
        if not zipfile.is_zipfile(path):
            return  # a legacy (pre-1.6) torch file or not a checkpoint at all: torch.load tells
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as e:  # BadZipFile, and whatever a damaged header makes zipfile raise
        raise CheckpointError(f"checkpoint {path} is corrupt: its archive cannot be read ({_first_line(e)})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its member {bad} fails its CRC-32 check (a damaged "
                              "file or a copy cut short); use another checkpoint")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def rng_state() -> dict[str, Any]:
    """Every RNG state the training touches: Python, NumPy, torch CPU and every CUDA device.

    Tensors, numbers, strings, tuples and dicts only, so that a checkpoint holding it loads under the restricted
    unpickler: NumPy's state (a uint32 array of the Mersenne Twister's key beside four numbers) as a dict with
    the key in an int64 tensor.
    """
    name, key, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"algorithm": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (or the tuple NumPy state of a teskd_fast 0.1 checkpoint)."""
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        key = saved["key"].numpy().astype(np.uint32)
        saved = (saved["algorithm"], key, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
    np.random.set_state(saved)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in states])


def repair_best(run_dir: str | Path, epoch: int, position: int, best: dict[str, Any]) -> bool:
    """Make ``best.pt`` the state that ``last.pt`` names as the best; returns whether it was rewritten.

    A run writes ``last.pt``, then copies it to ``best.pt`` when the epoch is the best so far: a process killed
    between the two leaves a ``last.pt`` of the best epoch and a ``best.pt`` that is missing or older. That
    ``last.pt`` (saved at the end of the best epoch: ``epoch == best["epoch"]``, ``position == 0``) is the best
    state, and is copied again. A ``best.pt`` that disagrees with an earlier best epoch cannot be rebuilt (that
    state is gone): a warning names it.

    Args:
        run_dir: the run folder (locked by the caller).
        epoch, position, best: the finished epochs, the position inside the next one and the ``best`` record of
            the folder's ``last.pt``.
    """
    folder = Path(run_dir)
    if best.get("epoch", 0) < 1:
        return False
    path = folder / "best.pt"
    try:
        # Mapped, not read (torch maps only its zip format: another file, say a bare pickle, is read and refused).
        held = load_torch(path, mmap=path.is_file() and zipfile.is_zipfile(path))
        agrees = held.get("epoch") == best["epoch"] and held.get("best") == best
        del held  # the mapping closed before best.pt may be replaced
    except UnsafeFileError as e:  # not a file this run wrote: refused, not overwritten unread
        raise CheckpointError(str(e)) from None
    except Exception:  # missing, cut short or not a checkpoint: rewritten (or warned about) below
        agrees = False
    if agrees:
        return False
    if epoch == best["epoch"] and position == 0:
        atomic_copy(folder / "last.pt", path)
        return True
    warnings.warn(f"{path} does not hold epoch {best['epoch']}, the best that {folder / 'last.pt'} records, and "
                  "cannot be rebuilt (that state was not kept)", stacklevel=2)
    return False


def load_resume(run_dir: str | Path) -> dict[str, Any]:
    """The last.pt of a run folder, checked to be one of ours."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        if (Path(run_dir) / "config.yaml").is_file():
            # A run that failed before its first checkpoint: its folder does not block the same command.
            raise FileNotFoundError(f"--resume {run_dir}: the run there stopped before its first checkpoint "
                                    "(config.yaml, no last.pt), so there is nothing to resume; start it again with "
                                    f"its command (teskd-train ... --out {run_dir}), which reuses the folder")
        raise FileNotFoundError(f"--resume {run_dir}: no last.pt there (nothing to resume)")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {run_dir}: {path} is not a teskd-train checkpoint")
    if "metrics" not in ckpt:
        # Checkpoints hold every finished epoch's metrics row since before teskd_fast 0.1 (the oldest release
        # whose checkpoints resume); one without them is refused rather than resumed with its files' rows guessed.
        raise ValueError(f"--resume {run_dir}: {path} was written by a teskd-train older than teskd_fast 0.1 (it "
                         "holds no metrics rows) and cannot be resumed; start a new run")
    return ckpt
