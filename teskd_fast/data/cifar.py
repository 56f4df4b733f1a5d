"""CIFAR-10 / CIFAR-100 held whole on the device as uint8 and augmented there in batches.

Training batches apply torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` distribution
exactly (crop offsets uniform in -4..4, independently in x and y; zero padding; flip with p = 0.5), then
normalise with the recipe's CIFAR mean and std. A batch is one gather from the zero-padded uint8 split (crop and
flip folded into its indices), one conversion and one multiply-add: no per-image work, no workers.
"""

import io
import pickle
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from teskd_fast.data.common import (
    AUGMENT_STREAM,
    CIFAR_MEAN,
    CIFAR_STD,
    CorruptDatasetError,
    DatasetNotFoundError,
    EpochState,
    check_dtype,
    check_sharding,
    epoch_order,
    normalize_,
    normalize_constants,
    torch_generator,
)
from teskd_fast.device import resolve_device
from teskd_fast.serialization import CIFAR_ADVICE, UnsafeFileError, load_plain_pickle

PAD = 4
SIZE = 32
# PyTorch runs an elementwise or gather op on the calling thread when it has fewer elements than its intra-op
# grain size (at::internal::GRAIN_SIZE, 32768). On the CPU a batch is made in chunks of this many images, so
# that every op stays below it: no OpenMP team is woken or waited for, and no thread setting is touched.
CPU_CHUNK = 32768 // (3 * SIZE * SIZE)

_LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
        "classes": 10,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
        "classes": 100,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


def _layout(dataset):
    if dataset not in _LAYOUTS:
        raise ValueError(f"dataset must be one of {sorted(_LAYOUTS)}, got {dataset!r}")
    return _LAYOUTS[dataset]


def locate_cifar(root, dataset="cifar100") -> Path:
    """The extracted folder or the .tar.gz of ``dataset`` under ``root`` (or ``root`` itself).

    Raises:
        DatasetNotFoundError: neither is there; the message says where it looked and how to get it.
    """
    layout = _layout(dataset)
    root = Path(root).expanduser()
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        return root
    if (root / layout["folder"] / layout["test"][0]).is_file():
        return root / layout["folder"]
    if (root / layout["test"][0]).is_file() and (root / layout["train"][0]).is_file():
        return root
    if (root / layout["archive"]).is_file():
        return root / layout["archive"]
    raise DatasetNotFoundError(
        f"{dataset} not found: looked for the folder {root / layout['folder']}/ and the archive "
        f"{root / layout['archive']} (the python version of the dataset). Get it with "
        f"cifar_loaders({str(root)!r}, dataset={dataset!r}, download=True) (teskd-train: --download), or "
        f"download {layout['url']} into "
        f"{root}/ (the .tar.gz works as it is, or extracted)."
    )


def _unpickle(fileobj, name):
    # A restricted unpickler: a batch file holds dicts, lists, strings, bytes, numbers and NumPy arrays, and one
    # that names any other type is refused unbuilt (a pickle can run any code it names).
    try:
        return load_plain_pickle(fileobj, name, encoding="latin1", advice=CIFAR_ADVICE)
    except UnsafeFileError as e:
        raise CorruptDatasetError(str(e)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError) as e:
        raise CorruptDatasetError(f"{name}: not a CIFAR python-version batch file ({e})") from e


def _member_name(source, name):
    """How messages name the batch file ``name`` of ``source``: its path, or ``archive:member`` in an archive."""
    return str(source / name) if source.is_dir() else f"{source}:{name}"


def _read_members(source, names):
    """Unpickled objects of the batch files ``names`` from a folder or a tar archive."""
    if source.is_dir():
        out = {}
        for name in names:
            path = source / name
            if not path.is_file():
                raise DatasetNotFoundError(f"{path} is missing: the CIFAR folder {source} is incomplete")
            with open(path, "rb") as f:
                out[name] = _unpickle(f, str(path))
        return out
    try:
        with tarfile.open(source, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            out = {}
            for name in names:
                if name not in members:
                    raise DatasetNotFoundError(f"{source} has no member {name}: not a CIFAR python-version archive")
                out[name] = _unpickle(io.BytesIO(tar.extractfile(members[name]).read()), f"{source}:{name}")
            return out
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        if isinstance(e, DatasetNotFoundError):
            raise
        raise CorruptDatasetError(f"{source}: cannot read the archive ({e}); delete it and download it again") from e


def _entry(batch, key, where):
    """``batch[key]`` of an unpickled CIFAR file, or a CorruptDatasetError naming the file and what it holds."""
    if not isinstance(batch, dict):
        raise CorruptDatasetError(f"{where}: holds a pickled {type(batch).__name__}, not a CIFAR python-version "
                                  f"batch (a dict with {key!r})")
    if key not in batch:
        keys = sorted(map(str, batch))
        raise CorruptDatasetError(f"{where}: no {key!r} entry (it has {keys[:8]}{' ...' if len(keys) > 8 else ''}); "
                                  "not a CIFAR python-version batch file")
    return batch[key]


def _split_arrays(batch, where, labels_key, classes):
    """(images [N, 3, 32, 32] uint8, labels [N] int64) of one unpickled batch file, checked."""
    try:
        data = np.asarray(_entry(batch, "data", where))
        lab = np.asarray(_entry(batch, labels_key, where))
    except (TypeError, ValueError) as e:
        if isinstance(e, CorruptDatasetError):
            raise
        raise CorruptDatasetError(f"{where}: its data or labels are not arrays ({e})") from e
    if data.ndim != 2 or data.shape[1] != 3 * SIZE * SIZE or data.dtype.kind not in "ui":
        raise CorruptDatasetError(f"{where}: data is {data.dtype} of shape {data.shape}, expected uint8 [N, 3072]")
    if data.shape[0] == 0:
        raise CorruptDatasetError(f"{where}: holds no image (data has shape {data.shape})")
    if data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255):
        raise CorruptDatasetError(f"{where}: pixel values in [{data.min()}, {data.max()}], expected 0..255")
    n = data.shape[0]
    if lab.shape != (n,) or lab.dtype.kind not in "ui":
        found = f"labels {lab.dtype} of shape {lab.shape} for {n} images"
    elif lab.min() < 0 or lab.max() >= classes:
        found = f"labels in [{lab.min()}, {lab.max()}]"
    else:
        return data.astype(np.uint8, copy=False).reshape(-1, 3, SIZE, SIZE), lab.astype(np.int64, copy=False)
    raise CorruptDatasetError(f"{where}: {found}; expected {n} integers in [0, {classes})")


def load_cifar(root, dataset="cifar100", download=False) -> dict[str, Any]:
    """Read a CIFAR split pair from the standard python-version archive or its extracted folder.

    Args:
        root: folder holding ``cifar-100-python/`` or ``cifar-100-python.tar.gz`` (``cifar-10-batches-py/``,
            ``cifar-10-python.tar.gz`` for CIFAR-10); the extracted folder or the archive itself also work.
        dataset: "cifar10" or "cifar100".
        download: fetch the archive into ``root`` with torchvision's downloader when it is missing.

    Shapes:
        images: [N, 3, 32, 32] uint8 (CHW, RGB); labels: [N] int64.

    Returns:
        dict with "train" and "test", each (images, labels), and "classes" (the class names).

    Raises:
        DatasetNotFoundError: the dataset, a batch file or an archive member is missing.
        CorruptDatasetError: an archive that cannot be read, or a batch file that is not a CIFAR batch (not a
            pickle, not a dict, without ``data`` or labels, no images, wrong shapes or labels); the message names
            the file (``archive:member`` inside an archive).
    """
    layout = _layout(dataset)
    try:
        source = locate_cifar(root, dataset)
    except DatasetNotFoundError:
        if not download:
            raise
        _download(root, dataset)
        source = locate_cifar(root, dataset)
    batches = _read_members(source, layout["train"] + layout["test"] + [layout["meta"]])
    where = _member_name(source, layout["meta"])
    names = _entry(batches[layout["meta"]], layout["names"], where)
    out = {"classes": list(names) if isinstance(names, (list, tuple)) else []}
    if len(out["classes"]) != layout["classes"]:
        raise CorruptDatasetError(f"{where}: {len(out['classes'])} class names under {layout['names']!r}, "
                                  f"expected {layout['classes']}")
    for split in ("train", "test"):
        arrays = [_split_arrays(batches[name], _member_name(source, name), layout["labels"], layout["classes"])
                  for name in layout[split]]
        out[split] = tuple(torch.from_numpy(np.concatenate(a)) for a in zip(*arrays, strict=True))
    return out


def _download(root, dataset):
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:
        raise DatasetNotFoundError(
            f"downloading {dataset} into {root} failed ({e}); download {_layout(dataset)['url']} there by hand"
        ) from e


class CifarLoader(EpochState):
    """Iterator over (images, labels) batches of a CIFAR split (or any small uint8 image set) held on the device.

    Args:
        images: [N, 3, 32, 32] uint8 (any device; moved to ``device`` once); any [N, C, H, W] uint8 with C 1 or 3
            serves too (the MNIST-format datasets: [N, 1, 28, 28]).
        labels: [N] integer class indices.
        batch_size: images per batch (per rank).
        train: shuffle every epoch and augment (random crop with ``pad``-pixel zero padding, horizontal flip when
            ``flip``).
        device: where the split lives and batches are made; None: CUDA when available.
        seed: the epoch's order and augmentation come from a CPU generator seeded by (seed, epoch).
        drop_last: drop the last incomplete batch.
        rank, world_size: DDP sharding; each rank reads a disjoint part of every epoch. Training shards are
            equal in size (the epoch is cut to a multiple of world_size); evaluation shards cover the split.
        channels_last: batches in channels_last memory format (the shape stays [B, 3, 32, 32]).
        dtype: float32, bfloat16 or float16 output (normalised in float32, rounded once).
        pad: the training crop's zero padding (CIFAR: 4). flip: horizontal flips with p = 0.5 in training.
        out_channels: channels of the batches; a single-channel split is repeated to 3 (normalised first, with
            one mean and std): every network of the package takes 3 channels. None: the split's own.

    Shapes:
        yields images [B, out_channels, H, W] ([B, 3, 32, 32] for CIFAR) of ``dtype`` and labels [B] int64, both on
        ``device``.

    State: ``epoch`` (advances after a complete pass) and ``position`` (batches handed out in this epoch).
    ``state_dict()`` / ``load_state_dict()`` resume mid-epoch exactly; ``set_epoch(e, start_batch=0)``
    selects an epoch. The next pass after either starts where they say; any other pass restarts the epoch.
    """

    def __init__(self, images, labels, *, batch_size=128, train=True, device=None, seed=27, drop_last=False,
                 rank=0, world_size=1, channels_last=False, dtype=torch.float32, mean=CIFAR_MEAN, std=CIFAR_STD,
                 classes=None, pad=PAD, flip=True, out_channels=None):
        check_sharding(batch_size, rank, world_size)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N, C, H, W] with C 1 or 3 (CIFAR: [N, 3, 32, 32]), got "
                             f"{images.dtype} {tuple(images.shape)}")
        channels, height, width = images.shape[1:]
        out_channels = channels if out_channels is None else int(out_channels)
        if out_channels != channels and channels != 1 or len(mean) != channels or len(std) != channels:
            raise ValueError(f"{channels}-channel images: need out_channels {channels} (or any from 1 channel) and "
                             f"{channels} mean and std values, got {out_channels}, {tuple(mean)}, {tuple(std)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [N={images.shape[0]}], got {tuple(labels.shape)}")
        self.device = resolve_device(device)
        self.dtype = check_dtype(dtype)
        self.batch_size, self.train, self.seed, self.drop_last = batch_size, train, seed, drop_last
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        self.mean, self.std, self.classes = tuple(mean), tuple(std), classes
        self.num_images = images.shape[0]
        self.pad, self.flip, self.size, self.out_channels = int(pad), bool(flip), (height, width), out_channels
        # A CPU batch is made in chunks whose every op stays below the intra-op grain size (see CPU_CHUNK).
        self._chunk = max(1, 32768 // (out_channels * height * width))
        # Training keeps the split zero-padded, so that one gather makes a padded crop; evaluation keeps it as is.
        pad = self.pad if train else 0
        data = torch.nn.functional.pad(images, (pad, pad, pad, pad)) if pad else images
        # [N, C, H + 2 pad, W + 2 pad] uint8, stored in the output's memory format so that gathers read in order.
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.data = data.to(self.device).contiguous(memory_format=fmt)
        self._flat = self.data.permute(0, 2, 3, 1).reshape(-1) if channels_last else self.data.view(-1)
        self.labels = labels.to(self.device, torch.int64)
        # Made once: the normalisation constants and the index offsets of a crop's rows, columns and channels.
        self._constants = normalize_constants(self.mean, self.std, self.device)
        self._rows = torch.arange(height, device=self.device)
        self._cols = torch.arange(width, device=self.device)
        self._chan = torch.arange(channels, device=self.device) * self.data.stride(1)
        # Gather straight into the channels_last order on a GPU (one kernel writes the output layout). On the CPU
        # chunks are built in NCHW order, where the normalisation vectorises, and the copy into the batch
        # buffer makes the layout.
        self._nhwc = channels_last and self.device.type != "cpu"
        self._init_state()

    @property
    def images(self) -> torch.Tensor:
        """The split as stored, without padding: [N, C, H, W] uint8 on the device."""
        p, (h, w) = self.pad if self.train else 0, self.size
        return self.data[:, :, p : p + h, p : p + w]

    def epoch_plan(self, epoch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The epoch's sample indices for this rank and their crop offsets and flips (CPU tensors).

        Returns:
            indices [n] int64; offsets [n, 2] int64 (y, x) in 0..2 pad (CIFAR: 0..8, i.e. shifts -4..4); flips [n]
            bool (all False without ``flip``).
        """
        order, positions = epoch_order(self.num_images, shuffle=self.train, seed=self.seed, epoch=epoch,
                                       rank=self.rank, world_size=self.world_size, equal_shards=self.train)
        if not self.train:
            return order[positions], None, None
        g = torch_generator(self.seed, epoch, AUGMENT_STREAM)
        # Drawn for the whole epoch order, so a sample's augmentation does not depend on the sharding.
        offsets = torch.randint(0, 2 * self.pad + 1, (len(order), 2), generator=g)
        flips = torch.rand(len(order), generator=g) < 0.5
        if not self.flip:
            flips.zero_()
        return order[positions], offsets[positions], flips[positions]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._begin_pass()
        indices, offsets, flips = self.epoch_plan(epoch)
        indices = indices.to(self.device, non_blocking=True)
        if self.train:
            offsets = offsets.to(self.device, non_blocking=True)
            flips = flips.to(self.device, non_blocking=True)
        for k in range(start, len(self)):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            if self.train:
                images = self._batch(self._augment, indices[sl], offsets[sl], flips[sl])
            else:
                images = self._batch(self._plain, indices[sl])
            labels = self.labels.index_select(0, indices[sl])
            self.position = k + 1
            yield images, labels
        self._end_pass(epoch)

    def _batch(self, make, idx, *plan):
        """``make(idx, *plan)`` for the whole batch on a GPU; on the CPU chunk by chunk (see ``CPU_CHUNK``)."""
        if self.device.type != "cpu":
            return make(idx, *plan)
        n = len(idx)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((n, self.out_channels, *self.size), dtype=self.dtype, device=self.device,
                          memory_format=fmt)
        for a in range(0, n, self._chunk):
            b = min(a + self._chunk, n)
            out[a:b] = make(idx[a:b], *(p[a:b] for p in plan))
        return out

    def _finish(self, x):
        # x: [B, C, H, W] uint8 in the output memory format.
        x = normalize_(x.float(), self.mean, self.std, self._constants)
        if self.out_channels != x.shape[1]:  # one channel repeated
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            return x.to(self.dtype).expand(-1, self.out_channels, -1, -1).contiguous(memory_format=fmt)
        return x if self.dtype == torch.float32 else x.to(self.dtype)

    def _plain(self, idx):
        x = self.data.index_select(0, idx)
        if self._nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._finish(x)

    def _augment(self, idx, offsets, flips):
        ar = self._cols
        rows = offsets[:, :1] + self._rows  # [B, H]
        cols = torch.where(flips[:, None], offsets[:, 1:] + (len(ar) - 1) - ar, offsets[:, 1:] + ar)  # [B, W]
        s_n, _, s_h, s_w = self.data.stride()
        chan = self._chan
        # Linear index of every output pixel in the padded split: crop and flip in one gather.
        pix = (idx * s_n)[:, None, None] + (rows * s_h)[:, :, None] + (cols * s_w)[:, None, :]  # [B, H, W]
        pix = pix[..., None] + chan if self._nhwc else pix[:, None] + chan[:, None, None]
        # index_select, not take or x[pix]: on the CPU it runs on the calling thread below the grain size.
        x = self._flat.index_select(0, pix.view(-1)).view(pix.shape)
        # Gathered as [B, H, W, C] (channels_last on a GPU) or [B, C, H, W].
        return self._finish(x.permute(0, 3, 1, 2) if self._nhwc else x)


def cifar_loaders(root, dataset="cifar100", batch_size=128, device="cuda", seed=27, drop_last=False,
                  download=False, *, rank=0, world_size=1, channels_last=False, dtype=torch.float32,
                  eval_batch_size=None) -> tuple[CifarLoader, CifarLoader]:
    """Training and test loaders over CIFAR-10 / CIFAR-100, the whole split resident on ``device``.

    Args:
        root: folder with the python-version archive (``cifar-100-python.tar.gz``) or its extracted folder.
        dataset: "cifar100" or "cifar10".
        batch_size: training batch per rank (evaluation uses ``eval_batch_size``, default the same).
        device: where the data lives and batches are made ("cuda", "cpu", ...; None: CUDA when available).
        seed: seeds each epoch's order and augmentation (same seed, same batches).
        drop_last: drop the incomplete last training batch (the test loader never drops).
        download: fetch the archive with torchvision's downloader when missing.
        rank, world_size: DDP sharding (disjoint shards every epoch).
        channels_last: channels_last memory format. dtype: float32, bfloat16 or float16 output.

    Shapes:
        each loader yields images [B, 3, 32, 32] (normalised) and labels [B] int64 on ``device``.

    Returns:
        (train, test): :class:`CifarLoader` objects; ``train.classes`` holds the class names.
    """
    data = load_cifar(root, dataset, download=download)
    common = dict(device=device, seed=seed, rank=rank, world_size=world_size, channels_last=channels_last,
                  dtype=dtype, classes=data["classes"])
    train = CifarLoader(*data["train"], batch_size=batch_size, train=True, drop_last=drop_last, **common)
    test = CifarLoader(*data["test"], batch_size=eval_batch_size or batch_size, train=False, drop_last=False,
                       **common)
    return train, test
