"""``teskd-scan ROOT``: decode-check every image of an ImageFolder tree and cache the list of good files.

A file is bad when it cannot be decoded completely (truncated, not an image, not a regular file: a FIFO is never
waited on) or when its content is not JPEG (the nvjpeg loader reads JPEG only; ``--allow-png`` accepts PNG),
whatever its name says. Greyscale and CMYK JPEGs that decode are good: every backend converts them to RGB. A
class folder without a good image is a problem too: the loaders refuse it. Hidden entries (a name starting with
".") are skipped, as every loader skips them. The cache (``ROOT/teskd_scan.json``, or ``--cache PATH``) records
every file with its format (None: undecodable), size and modification time; the loaders read it when it is present
and then never open an undecodable file, read the decodable files of every format they decode (a PNG the scan
flagged as "not JPEG" is read by the torchvision and DALI loaders, left out by nvjpeg), and refuse a cache that is
out of date (files added, removed or changed since the scan). Where the cache cannot be written (a
read-only dataset), the scan warns, names the path and carries on: its findings are printed all the same.

Exit status of ``teskd-scan``: 0 every file and class folder is good; 1 bad files or class folders without a
good image were found (each printed on its own line, ``BAD <path>: <reason>`` or ``EMPTY <folder>: <reason>``);
2 nothing could be scanned (ROOT is not a folder, or has no class folder). A cache that could not be written
changes nothing in the status (a warning on stderr says so).
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from teskd_fast.data.common import CorruptDatasetError, DatasetNotFoundError
from teskd_fast.data.folder import (
    CACHE_FORMAT,
    CACHE_NAME,
    IMG_EXTENSIONS,
    list_classes,
    list_images,
    open_regular,
    resolve_folder,
    visible_entries,
)

SPLITS = ("train", "val")


class CacheNotWrittenWarning(UserWarning):
    """The scan cache could not be written (a read-only dataset): the message names the path and what to do."""


@dataclass
class ScanReport:
    """Result of :func:`scan_image_folder`: counts, the bad files and empty class folders with reasons, the cache.

    ``cache_path`` is where the cache was written (None when it was not); ``cache_error`` why it could not be.
    """

    root: Path
    splits: dict = field(repr=False)
    bad: list
    num_files: int
    cache_path: Path | None
    empty_classes: list = field(default_factory=list)
    cache_error: str | None = None

    @property
    def ok(self) -> bool:
        """Nothing the loaders would refuse: no bad file, no class folder without a good image."""
        return not self.bad and not self.empty_classes


def inspect_image(path) -> tuple[str | None, str | None]:
    """``(format, None)`` when the file at ``path`` decodes completely (format: Pillow's name, "JPEG", "PNG", ...),
    else ``(None, why)``. Only a regular file is opened (a FIFO, socket or device is unreadable, never waited on)."""
    from PIL import Image

    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read the file ({e.strerror or e})"
    if not data:
        return None, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()
            mode = img.mode
    # Pillow signals a broken file with several exception types (OSError for truncation and unknown formats,
    # SyntaxError and ValueError from some parsers, DecompressionBombError); any of them makes the file bad.
    except Exception as e:  # noqa: BLE001
        return None, f"cannot decode: {type(e).__name__}: {e}"
    if mode not in ("L", "RGB", "CMYK", "YCbCr", "P", "LA", "RGBA", "I;16"):
        return None, f"unsupported pixel mode {mode}"
    return fmt, None


def format_reason(fmt, path, formats) -> str | None:
    """Why a file that decodes as ``fmt`` is flagged when only ``formats`` are accepted, or None."""
    if fmt in formats:
        return None
    accept = " (accept PNG files with `teskd-scan --allow-png`)" if fmt == "PNG" else ""
    return (f"{fmt} image, not {' or '.join(formats)} (the name says {Path(path).suffix}); the nvjpeg loader "
            f"decodes JPEG only, the torchvision and DALI loaders read it{accept}")


def check_image(path, formats=("JPEG",)) -> str | None:
    """Why the file at ``path`` is unusable, or None when it decodes completely in one of ``formats``."""
    fmt, reason = inspect_image(path)
    return reason if fmt is None else format_reason(fmt, path, formats)


def _split_dirs(root):
    """{"train": path, "val": path} when ``root`` holds split folders, else {"": root} (one ImageFolder)."""
    present = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if present and all(any(e.is_dir() for e in visible_entries(p)) for p in present.values()):
        return present
    return {"": root}


def scan_image_folder(root, workers=None, cache=None, write_cache=True, formats=("JPEG",),
                      progress=False) -> ScanReport:
    """Decode-check every image of an ImageFolder tree in parallel and write the list of good files.

    Args:
        root: an ImageNet-style root holding ``train/`` and/or ``val/`` (each ``<class>/<image>``), or a
            single ImageFolder split.
        workers: decoding threads (Pillow releases the GIL while decoding); default: all cores.
        cache: where to write the cache; default ``root/teskd_scan.json``. The loaders look for it there
            (or in the split folder), or take its path as ``scan_cache=``.
        write_cache: False only reports.
        formats: Pillow format names accepted as good ("JPEG"; add "PNG" for PNG datasets read by
            DALI or torchvision).
        progress: show a progress bar on stderr.

    Returns:
        ScanReport with ``bad`` = [(path, reason)] sorted by path, ``empty_classes`` = [(class folder, reason)]
        for the class folders left without a good image (the loaders refuse them); ``ok`` is True when neither
        has an entry. A cache that cannot be written (a read-only dataset) gives a
        :class:`CacheNotWrittenWarning` naming the path, ``cache_path=None`` and the reason in ``cache_error``.
    """
    root = resolve_folder(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root} is not a folder: give the dataset root (holding train/ and val/) "
                                   f"or one ImageFolder split (holding one folder per class)")
    split_dirs = _split_dirs(root)
    jobs = []
    listing = {}
    for split, split_dir in split_dirs.items():
        classes = list_classes(split_dir)
        listing[split] = classes
        for label, name in enumerate(classes):
            # Each file's size and time before it is read: a file changed during the scan looks stale later.
            jobs.extend((split, f"{name}/{f}", label, size, mtime)
                        for f, size, mtime in list_images(split_dir / name, stats=True))
    paths = [str(split_dirs[s] / rel) for s, rel, *_ in jobs]
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(inspect_image, paths, chunksize=64 if len(paths) > 4096 else 1)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc=f"teskd-scan {root}", unit="file", file=sys.stderr)
        reasons = list(results)
    splits = {s: {"classes": c, "files": []} for s, c in listing.items()}
    entries = {s: [] for s in listing}
    bad = []
    found = {s: [0] * len(c) for s, c in listing.items()}
    good = {s: [0] * len(c) for s, c in listing.items()}
    other = {s: [[] for _ in c] for s, c in listing.items()}  # decodable, of a format not in ``formats`` (PNG)
    for (split, rel, label, size, mtime), path, (fmt, reason) in zip(jobs, paths, reasons, strict=True):
        found[split][label] += 1
        entries[split].append([rel, label, fmt, size, mtime])
        if fmt is not None:
            reason = format_reason(fmt, path, formats)
        if reason is None:
            splits[split]["files"].append([rel, label])
            good[split][label] += 1
        else:
            bad.append((path, reason))
            if fmt is not None:
                other[split][label].append(fmt)
    empty = []
    for split, classes in listing.items():
        for label, name in enumerate(classes):
            if good[split][label] == 0:
                n, m = found[split][label], len(other[split][label])
                if m:  # the torchvision and DALI loaders read these files: only nvjpeg refuses the folder
                    fmts = sorted(set(other[split][label]))
                    accept = " (accept them with `teskd-scan --allow-png`)" if fmts == ["PNG"] else ""
                    empty.append((str(split_dirs[split] / name),
                                  f"class folder with no {' or '.join(formats)} image ({m} of its {n} file(s) are "
                                  f"{' or '.join(fmts)} images); the torchvision and DALI loaders read them, the "
                                  f"nvjpeg loader refuses the folder{accept}"))
                    continue
                what = f"no good image (its {n} file(s) are bad)" if n else \
                    f"no image file (extensions {', '.join(IMG_EXTENSIONS)})"
                empty.append((str(split_dirs[split] / name), f"class folder with {what}; the loaders refuse it: "
                                                              "remove the folder or add images"))
    cache_path = cache_error = None
    if write_cache:
        target = Path(cache) if cache is not None else root / CACHE_NAME
        payload = {"format": CACHE_FORMAT, "root": str(root), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "formats": list(formats),
                   "splits": {s: {"classes": listing[s], "entries": entries[s]} for s in listing},
                   "bad": [{"path": p, "reason": r} for p, r in bad],
                   "empty_classes": [{"path": p, "reason": r} for p, r in empty]}
        cache_error = _write_cache(payload, target, root)
        cache_path = None if cache_error else target
    return ScanReport(root, splits, sorted(bad), len(paths), cache_path, sorted(empty), cache_error)


def _write_cache(payload, path, root):
    """Write the cache atomically (a temporary file in the same folder, then a rename).

    Returns None, or why it could not be written (also given as a :class:`CacheNotWrittenWarning`)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
        return None
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        message = (f"cannot write the scan cache {path} ({e.strerror or e}); the findings stand, but the loaders "
                   f"will not use them: write the cache elsewhere with `teskd-scan {root} --cache PATH` and give "
                   "it to the loaders (imagenet_loaders(..., scan_cache=PATH))")
        warnings.warn(message, CacheNotWrittenWarning, stacklevel=3)
        return message


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text) -> str:
    """``text`` on one line: backslashes and control characters (newlines included) as backslash escapes.

    The report prints one entry a line; a file name holding a newline could otherwise print a line of its own
    (a fake ``EMPTY ...`` entry). Printable characters, non-ASCII ones included, are kept as they are.
    """
    return "".join(_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else
                                       f"\\u{ord(c):04x}" if c in "\x85\u2028\u2029" else c) for c in str(text))


def main(argv=None) -> int:
    """Entry point of ``teskd-scan``; exit status 0 nothing found, 1 bad files or empty class folders, 2 no scan."""
    parser = argparse.ArgumentParser(
        prog="teskd-scan",
        description="Decode-check every image of an ImageFolder tree (ROOT/train/<class>/*.JPEG, ROOT/val/...) in "
        "parallel, list each unreadable or non-JPEG file with the reason, and write the list of good files that "
        "teskd_fast's loaders then use.",
    )
    parser.add_argument("root", help="dataset root (holding train/ and val/) or one ImageFolder split")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: all cores)")
    parser.add_argument("--cache", default=None, help=f"where to write the cache (default: ROOT/{CACHE_NAME}); for a "
                        "read-only dataset, a path elsewhere (then pass it to the loaders as scan_cache=PATH)")
    parser.add_argument("--no-cache", action="store_true", help="report only; write no cache")
    parser.add_argument("--allow-png", action="store_true", help="accept PNG files (DALI and torchvision read them)")
    parser.add_argument("--progress", action="store_true", help="progress bar on stderr")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    formats = ("JPEG", "PNG") if args.allow_png else ("JPEG",)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # The report carries the reason; it is printed below as the command's own warning.
            warnings.simplefilter("ignore", CacheNotWrittenWarning)
            report = scan_image_folder(args.root, workers=args.workers, cache=args.cache,
                                       write_cache=not args.no_cache, formats=formats, progress=args.progress)
    except (DatasetNotFoundError, CorruptDatasetError, OSError) as e:
        print(f"teskd-scan: error: {escape(e)}", file=sys.stderr)
        return 2
    for path, reason in report.bad:
        print(f"BAD {escape(path)}: {escape(reason)}")
    for path, reason in report.empty_classes:
        print(f"EMPTY {escape(path)}: {escape(reason)}")
    if report.cache_error:
        print(f"teskd-scan: warning: {report.cache_error}", file=sys.stderr)
    summary = ", ".join(f"{s or 'root'}: {len(v['files'])} good in {len(v['classes'])} classes"
                        for s, v in report.splits.items())
    empty = f", {len(report.empty_classes)} class folder(s) without a good image" if report.empty_classes else ""
    print(f"teskd-scan: {report.num_files} files checked in {time.perf_counter() - start:.1f}s ({summary}); "
          f"{len(report.bad)} bad{empty}"
          + (f"; good-file list written to {escape(report.cache_path)}" if report.cache_path else ""))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
