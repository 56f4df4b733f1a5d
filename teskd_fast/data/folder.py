"""The ImageFolder layout (root/<split>/<class>/<image>), its class mapping, and the scan cache that filters it.

Classes are the sorted names of the class folders, as torchvision's ImageFolder maps them; every backend
uses this index, so the class indices agree across backends. Hidden entries (a name starting with ".": a
Jupyter ``.ipynb_checkpoints/``, macOS's ``._x.jpg``) are neither classes nor images, for every reader
(:func:`is_hidden`). Only regular files are opened (:func:`open_regular`): a FIFO, socket or device named like an
image is a bad file, never a read that blocks.
"""

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from teskd_fast.data.common import SCAN_HINT, CorruptDatasetError, DatasetNotFoundError

# torchvision's ImageFolder extensions: the files a loader reads (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_NAME = "teskd_scan.json"
# /2: every listed file with its image format (None: undecodable), size and modification time (staleness).
CACHE_FORMAT = "teskd-scan/2"


def is_hidden(name) -> bool:
    """Whether a folder entry is hidden: its name starts with "." (never a class, an image or a split)."""
    return str(name).startswith(".")


def visible_entries(folder) -> list[os.DirEntry]:
    """The entries of ``folder`` that are not hidden (:func:`is_hidden`), in the order ``os.scandir`` gives."""
    with os.scandir(folder) as it:
        return [e for e in it if not is_hidden(e.name)]


def open_regular(path) -> BinaryIO:
    """``open(path, "rb")`` for a regular file; any other kind (FIFO, socket, device) is an OSError naming it.

    The file is opened without blocking (a FIFO without a writer would block a plain open) and checked on the
    descriptor, so nothing can swap the file between the check and the read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
            raise OSError(errno.EINVAL, f"{kind}, not an image file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@dataclass
class FolderIndex:
    """One split: its folder, its classes and its samples as (path relative to ``root``, class index)."""

    root: Path
    classes: list
    samples: list = field(repr=False)
    from_scan: Path | None = None

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def path(self, i) -> str:
        return str(self.root / self.samples[i][0])


def list_classes(split_dir) -> list[str]:
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f"image folder {split_dir} not found: expected the ImageFolder layout {split_dir}/<class>/<image>.JPEG "
            f"(for ImageNet, ROOT/train and ROOT/val with one folder per class)"
        )
    classes = sorted(e.name for e in visible_entries(split_dir) if e.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image>.JPEG")
    return classes


def list_images(class_dir, stats=False) -> list:
    """Image files (ImageFolder's extensions) under ``class_dir``, recursively, as sorted relative paths.

    Hidden files and folders (:func:`is_hidden`) are skipped. With ``stats``: ``(path, size, mtime_ns)`` tuples
    (the scan cache's record of each file, for its staleness check).

    Folder links are followed (a dataset assembled from links is common), but each real folder is read once: a
    link back into a folder already on the walk (a loop, ``a/sub -> .``) or a second link to a folder already
    read would list its images again, so it is refused with a :class:`CorruptDatasetError` naming the link.
    """
    class_dir = Path(class_dir)
    seen = {}
    out = []
    pending = [(class_dir, None)]  # a stack, not a recursive closure: no reference cycle per call
    while pending:
        folder, rel = pending.pop()
        info = os.stat(folder)
        key = (info.st_dev, info.st_ino)
        if key in seen:
            raise CorruptDatasetError(
                f"{folder} is a link to {seen[key]}, which is already read"
                f"{' (a link loop)' if _inside(folder, seen[key]) else ''}: its images would be listed twice; "
                f"remove the link"
            )
        seen[key] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise DatasetNotFoundError(f"cannot read the folder {folder}: {e.strerror or e}") from e
        for entry in reversed(entries):
            if is_hidden(entry.name):
                continue
            child = entry.name if rel is None else os.path.join(rel, entry.name)
            if entry.is_dir():  # follows links
                pending.append((Path(entry.path), child))
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                if stats:
                    try:
                        info = entry.stat()
                    except OSError:  # a dangling link: listed, and named as unreadable when read
                        info = None
                    out.append((child, info.st_size if info else -1, info.st_mtime_ns if info else -1))
                else:
                    out.append(child)
    return sorted(out)


def _inside(path, folder) -> bool:
    """Whether ``path`` (a link) lies inside ``folder``: the link then leads back to where it is."""
    try:
        Path(path).absolute().relative_to(Path(folder).absolute())
        return True
    except ValueError:
        return False


def resolve_folder(path) -> Path:
    """``path`` made absolute with its links resolved; a link loop is a :class:`DatasetNotFoundError` naming it."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # Python < 3.13 raises RuntimeError for a loop, later ones OSError
        raise DatasetNotFoundError(f"{path} cannot be resolved ({e}): a link loop? give the real folder") from e


def find_scan_cache(split_dir, scan_cache=None) -> Path | None:
    """The scan cache that covers ``split_dir``: given, in the split folder, or in its parent (dataset root)."""
    if scan_cache is not None:
        path = Path(scan_cache)
        if not path.is_file():
            raise DatasetNotFoundError(f"scan cache {path} not found; write it with `teskd-scan ROOT --cache {path}`")
        return path
    split_dir = Path(split_dir)
    for candidate in (split_dir / CACHE_NAME, split_dir.parent / CACHE_NAME):
        if candidate.is_file():
            return candidate
    return None


def read_scan_cache(path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptDatasetError(f"{path} is not a teskd-scan cache ({e}); run teskd-scan again") from e
    found = cache.get("format") if isinstance(cache, dict) else None
    if found != CACHE_FORMAT:
        older = isinstance(found, str) and found.startswith("teskd-scan/")
        what = "written by another version of teskd-scan" if older else "not a teskd-scan cache"
        raise CorruptDatasetError(f"{path} is {what} (format {found!r}, this one reads {CACHE_FORMAT!r}); "
                                  "run teskd-scan again")
    return cache


def stale_summary(recorded, current) -> str | None:
    """What changed between a scan's files and the folder's now, or None when nothing did.

    Args:
        recorded, current: ``{relative path: (size, mtime_ns)}`` at the scan and now.
    """
    added = sorted(set(current) - set(recorded))
    removed = sorted(set(recorded) - set(current))
    changed = sorted(p for p in set(current) & set(recorded) if tuple(current[p]) != tuple(recorded[p]))
    parts = [f"{len(v)} file(s) {what} (e.g. {v[0]})" for v, what in
             ((added, "added"), (removed, "removed"), (changed, "changed")) if v]
    return "; ".join(parts) or None


def _cached_samples(split_dir, classes, cache_path, formats):
    """The samples of ``split_dir`` from the scan cache at ``cache_path``, checked against the folder as it is now.

    A file is a sample when the scan decoded it and its format is one this reader takes (``formats``; None: any);
    a decodable file of a format the scan did not accept is left out, as the scan's ``BAD`` line said. A format
    the scan accepted that this reader cannot take is an error (the loaders never drop silently what the scan
    called good).
    """
    cache = read_scan_cache(cache_path)
    # Splits are keyed by their path relative to the scanned root ("train", "val", or "" for the root itself).
    cache_root = Path(cache.get("root", cache_path.parent)).resolve()
    hint = SCAN_HINT.format(root=cache_root)
    try:
        splits = cache["splits"]
        accepted = set(cache["formats"])
        key = os.path.relpath(split_dir, cache_root)
        key = "" if key == "." else key
        if key not in splits:
            raise CorruptDatasetError(f"scan cache {cache_path} does not cover {split_dir} (it holds "
                                      f"{sorted(splits)}); {hint}")
        entry = splits[key]
        if entry["classes"] != classes:
            raise CorruptDatasetError(f"scan cache {cache_path} lists other class folders than {split_dir} holds "
                                      f"now; {hint}")
        rows = [(str(rel), int(label), fmt, int(size), int(mtime)) for rel, label, fmt, size, mtime in entry["entries"]]
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CorruptDatasetError):
            raise
        raise CorruptDatasetError(f"{cache_path} is not a complete teskd-scan cache ({type(e).__name__}: {e}); "
                                  f"{hint}") from e
    current = {f"{name}/{rel}": (size, mtime) for name in classes
               for rel, size, mtime in list_images(split_dir / name, stats=True)}
    stale = stale_summary({rel: (size, mtime) for rel, _, _, size, mtime in rows}, current)
    if stale:
        raise CorruptDatasetError(f"scan cache {cache_path} is out of date for {split_dir}: {stale} since the scan "
                                  f"of {cache.get('created', '?')}; {hint} (or delete the cache: the loaders then "
                                  "read every image file)")
    samples, unreadable = [], []
    counts = dict.fromkeys(range(len(classes)), 0)
    for rel, label, fmt, _, _ in rows:
        if fmt is None:
            continue
        if formats is None or fmt in formats:
            samples.append((rel, label))
            counts[label] += 1
        elif fmt in accepted:
            unreadable.append((rel, fmt))
    if unreadable:
        kinds = sorted({fmt for _, fmt in unreadable})
        raise CorruptDatasetError(
            f"{len(unreadable)} file(s) of {split_dir} are {'/'.join(kinds)} (e.g. {split_dir / unreadable[0][0]}), "
            f"which the scan accepted but this loader cannot decode (it reads {', '.join(formats)} only): choose a "
            "loader that reads them (--loader torchvision or dali), or convert them")
    for label, count in counts.items():
        if count == 0:
            reading = "" if formats is None else f", reading {'/'.join(formats)}"
            raise DatasetNotFoundError(f"class folder {split_dir / classes[label]} has no readable image "
                                       f"(scan cache {cache_path}{reading})")
    return samples


def index_image_folder(split_dir, scan_cache=None, use_scan=True, formats=None) -> FolderIndex:
    """Index one ImageFolder split, using the good-file list of a ``teskd-scan`` cache when one is present.

    Args:
        split_dir: the split folder (``ROOT/train``) holding one folder per class.
        scan_cache: path of a cache written by ``teskd-scan``; default: ``teskd_scan.json`` in the split folder
            or in its parent.
        use_scan: False ignores any cache (every file with an image extension is listed).
        formats: the Pillow format names the reader decodes ("JPEG" for nvjpeg); None: any format Pillow reads.
            With a cache, a decodable file of another format is left out when the scan flagged it, an error when
            the scan accepted it.

    Returns:
        FolderIndex with sorted classes and samples sorted by class, then path.

    Raises:
        CorruptDatasetError: a cache that is not one, or out of date: files added, removed or changed (size or
            modification time) since the scan; the message says to run ``teskd-scan`` again.
    """
    split_dir = resolve_folder(split_dir)
    classes = list_classes(split_dir)
    cache_path = find_scan_cache(split_dir, scan_cache) if use_scan else None
    samples = []
    if cache_path is not None:
        samples = _cached_samples(split_dir, classes, cache_path, formats)
    else:
        for label, name in enumerate(classes):
            files = list_images(split_dir / name)
            if not files:
                raise DatasetNotFoundError(
                    f"class folder {split_dir / name} holds no image file (extensions {', '.join(IMG_EXTENSIONS)}); "
                    f"remove it or add its images, then {SCAN_HINT.format(root=split_dir)}"
                )
            samples.extend((f"{name}/{f}", label) for f in files)
    return FolderIndex(split_dir, classes, samples, cache_path)
