"""The ImageFolder layout (root/<split>/<class>/<image>), its class mapping, and the scan cache that filters it.

Classes are the sorted names of the class folders, as torchvision's ImageFolder maps them; every backend
uses this index, so the class indices agree across backends.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teskd_fast.data.common import SCAN_HINT, CorruptDatasetError, DatasetNotFoundError

# torchvision's ImageFolder extensions: the files a loader reads (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_NAME = "teskd_scan.json"
CACHE_FORMAT = "teskd-scan/1"


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
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetNotFoundError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image>.JPEG")
    return classes


def list_images(class_dir) -> list[str]:
    """Image files (ImageFolder's extensions) under ``class_dir``, recursively, as sorted relative paths.

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
            child = entry.name if rel is None else os.path.join(rel, entry.name)
            if entry.is_dir():  # follows links
                pending.append((Path(entry.path), child))
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
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
        raise CorruptDatasetError(f"{path} is not a teskd-scan cache (format {found!r}); run teskd-scan again")
    return cache


def index_image_folder(split_dir, scan_cache=None, use_scan=True) -> FolderIndex:
    """Index one ImageFolder split, using the good-file list of a ``teskd-scan`` cache when one is present.

    Args:
        split_dir: the split folder (``ROOT/train``) holding one folder per class.
        scan_cache: path of a cache written by ``teskd-scan``; default: ``teskd_scan.json`` in the split folder
            or in its parent.
        use_scan: False ignores any cache (every file with an image extension is listed).

    Returns:
        FolderIndex with sorted classes and samples sorted by class, then path.
    """
    split_dir = resolve_folder(split_dir)
    classes = list_classes(split_dir)
    cache_path = find_scan_cache(split_dir, scan_cache) if use_scan else None
    samples = []
    if cache_path is not None:
        cache = read_scan_cache(cache_path)
        # Splits are keyed by their path relative to the scanned root ("train", "val", or "" for the root itself).
        cache_root = Path(cache.get("root", cache_path.parent)).resolve()
        splits = cache["splits"]
        key = os.path.relpath(split_dir, cache_root)
        key = "" if key == "." else key
        if key not in splits:
            raise CorruptDatasetError(f"scan cache {cache_path} does not cover {split_dir} (it holds "
                                      f"{sorted(splits)}); {SCAN_HINT.format(root=cache_root)}")
        entry = splits[key]
        if entry["classes"] != classes:
            raise CorruptDatasetError(f"scan cache {cache_path} lists other class folders than {split_dir} holds "
                                      f"now; {SCAN_HINT.format(root=cache_root)}")
        counts = dict.fromkeys(range(len(classes)), 0)
        for rel, label in entry["files"]:
            samples.append((rel, label))
            counts[label] += 1
        for label, count in counts.items():
            if count == 0:
                raise DatasetNotFoundError(f"class folder {split_dir / classes[label]} has no readable image "
                                           f"(scan cache {cache_path})")
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
