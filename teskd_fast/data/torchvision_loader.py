"""The torchvision backend: ImageFolder + DataLoader, Pillow decoding in worker processes (the familiar baseline)."""

from collections.abc import Iterator
from functools import partial

import torch
from torchvision import datasets

from teskd_fast.data.common import SCAN_HINT, BadImageError
from teskd_fast.data.folder import open_regular
from teskd_fast.data.image_base import (
    TRAIN_RATIO,
    ImageLoaderBase,
    ListSampler,
    pad_of,
    unwrap_worker_error,
    workers_iterator,
)


def _pil_loader(path, root):
    from PIL import Image

    try:
        with open_regular(path) as f:  # a FIFO named .JPEG: an OSError now, not a read that never returns
            img = Image.open(f)
            return img.convert("RGB")
    # Pillow reports a broken file as OSError (truncated, unknown format), SyntaxError or ValueError.
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode {path}: {type(e).__name__}: {e}; {SCAN_HINT.format(root=root)}") from e


class _IndexedImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder whose samples come from the shared index (scan cache included), not a walk."""

    def __init__(self, index, **kwargs):
        self._index = index
        super().__init__(str(index.root), **kwargs)

    def find_classes(self, directory):
        # The index's classes: ImageFolder's own walk would count a hidden folder (.ipynb_checkpoints) as a class.
        return list(self._index.classes), self._index.class_to_idx

    def make_dataset(self, directory, class_to_idx, *args, **kwargs):
        return [(self._index.path(i), label) for i, (_, label) in enumerate(self._index.samples)]


class TorchvisionImageLoader(ImageLoaderBase):
    """ImageFolder + DataLoader: Pillow decodes in ``workers`` processes, uint8 batches travel in pinned memory.

    Training: RandomResizedCrop(image_size, scale ``crop_scale``, ratio 3/4-4/3) + RandomHorizontalFlip, or with
    ``augment="pad-crop"`` Resize((image_size, image_size)) + RandomCrop(image_size, padding=image_size // 8) +
    RandomHorizontalFlip; evaluation:
    Resize(val_resize) + CenterCrop(image_size). Normalisation runs on the device after the copy.
    Resuming mid-epoch gives the same remaining images; their random crops are drawn afresh.
    """

    backend = "torchvision"

    def __init__(self, index, **kwargs):
        super().__init__(index, **kwargs)
        self._sampler = ListSampler()
        self._loader = None
        self._loader_size = None

    def _make_dataset(self):
        from torchvision import transforms

        s = self.image_size
        if self.train and self.augment == "pad-crop":
            tf = [transforms.Resize((s, s)), transforms.RandomCrop(s, padding=pad_of(s)),
                  transforms.RandomHorizontalFlip()]
        elif self.train:
            tf = [transforms.RandomResizedCrop(s, scale=self.crop_scale, ratio=TRAIN_RATIO),
                  transforms.RandomHorizontalFlip()]
        else:
            tf = [transforms.Resize(self.val_resize), transforms.CenterCrop(self.image_size)]
        index = self.index
        dataset = _IndexedImageFolder(index, transform=transforms.Compose(tf + [transforms.PILToTensor()]),
                                      loader=partial(_pil_loader, root=index.root.parent))
        if dataset.classes != index.classes:
            raise RuntimeError(f"ImageFolder found other classes in {index.root} than the index; rebuild the loader")
        return dataset

    def _make_loader(self):
        workers = self.workers
        self._loader = torch.utils.data.DataLoader(
            self._make_dataset(), batch_size=self.batch_size, sampler=self._sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", drop_last=self.drop_last, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        self._loader_size = self.image_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._begin_pass()
        if self._loader is None or self._loader_size != self.image_size:
            self._loader = None
            self._make_loader()
        self._sampler.indices = self.epoch_indices(epoch)[start * self.batch_size :].tolist()
        k = start
        it = workers_iterator(self._loader)
        while True:
            try:
                images, labels = next(it)
            except StopIteration:
                break
            except BadImageError as e:
                raise unwrap_worker_error(e) from None
            k += 1
            self.position = k
            yield self._finish(images), labels.to(self.device, non_blocking=True)
        self._end_pass(epoch)
