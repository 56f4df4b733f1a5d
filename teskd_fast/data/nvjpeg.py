"""The nvjpeg backend: CPU workers read file bytes, the GPU decodes a whole batch and augments it.

``torchvision.io.decode_jpeg(list_of_bytes, device="cuda")`` decodes the batch with nvJPEG; a file the batch
call rejects is retried alone, then on the CPU (libjpeg-turbo, which handles CMYK), and a file nothing can
decode stops the run with :class:`teskd_fast.data.BadImageError` naming it. Training: torchvision's
RandomResizedCrop parameters (area 0.08-1, aspect 3/4-4/3, 10 tries, then a centre crop) drawn from a
generator seeded by (seed, epoch, rank, batch), an antialiased bilinear resize of each crop on the GPU, and a
flip with p = 0.5; evaluation: resize the shorter side to ``val_resize``, centre crop. The per-batch seeds
make a mid-epoch resume exact.

``imagenet_loaders`` accepts this backend only with a CUDA device. The class itself takes
``decode_device="cpu"`` so that the same code (batching, crops, error handling) is tested on machines
without a GPU; only the decode call then runs on the CPU.
"""

import math
import warnings

import torch
import torch.nn.functional as F

from teskd_fast.data.common import BadImageError, numpy_generator
from teskd_fast.data.image_base import TRAIN_RATIO, TRAIN_SCALE, ImageLoaderBase, ListSampler, unwrap_worker_error


class _FileBytes(torch.utils.data.Dataset):
    """(file bytes as a uint8 tensor, label, index) for each sample of the index."""

    def __init__(self, index):
        self.index = index

    def __len__(self):
        return len(self.index.samples)

    def __getitem__(self, i):
        path = self.index.path(i)
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        return data, self.index.samples[i][1], i


def _collate(batch):
    data, labels, idx = zip(*batch)
    return list(data), torch.tensor(labels, dtype=torch.int64), list(idx)


def random_resized_crop_params(height, width, rng, scale=TRAIN_SCALE, ratio=TRAIN_RATIO):
    """torchvision's RandomResizedCrop.get_params with a numpy generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class NvjpegImageLoader(ImageLoaderBase):
    """Batched GPU JPEG decoding with torchvision (see the module docs). Built by ``imagenet_loaders``."""

    backend = "nvjpeg"

    def __init__(self, index, decode_device=None, **kwargs):
        super().__init__(index, **kwargs)
        self.decode_device = self.device if decode_device is None else torch.device(decode_device)
        self._sampler = ListSampler()
        workers = self.workers
        self._loader = torch.utils.data.DataLoader(
            _FileBytes(index), batch_size=self.batch_size, sampler=self._sampler, num_workers=workers,
            collate_fn=_collate, drop_last=self.drop_last, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def _decode(self, data, idx):
        with warnings.catch_warnings():
            # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they still work.
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._decode_batch(data, idx)

    def _decode_batch(self, data, idx):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.decode_device)
        except RuntimeError:
            pass
        # The batch call failed: retry one by one, then on the CPU, to decode the good ones and name the bad one.
        out = []
        for d, i in zip(data, idx):
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.decode_device))
                continue
            except RuntimeError as e:
                gpu_error = e
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB).to(self.decode_device))
            except RuntimeError as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else str(gpu_error)
                raise self.bad_file_error(self.index.path(i), f"not a decodable JPEG ({reason})") from None
        return out

    def _augment(self, images, rng):
        s = self.image_size
        out = torch.empty(len(images), 3, s, s, device=self.decode_device)
        for n, img in enumerate(images):
            top, left, h, w = random_resized_crop_params(img.shape[1], img.shape[2], rng)
            crop = img[None, :, top : top + h, left : left + w].float()
            crop = F.interpolate(crop, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            out[n] = crop[0].flip(-1) if rng.random() < 0.5 else crop[0]
        return out

    def _eval_transform(self, images):
        s, r = self.image_size, self.val_resize
        out = torch.empty(len(images), 3, s, s, device=self.decode_device)
        for n, img in enumerate(images):
            h, w = img.shape[1:]
            # torchvision's Resize(r): the shorter side becomes r, the longer int(r * long / short).
            size = (r, int(r * w / h)) if h <= w else (int(r * h / w), r)
            img = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
            top, left = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
            out[n] = img[0, :, top : top + s, left : left + s]
        return out

    def __iter__(self):
        epoch, start = self._begin_pass()
        self._sampler.indices = self.epoch_indices(epoch)[start * self.batch_size :].tolist()
        k = start
        it = iter(self._loader)
        while True:
            try:
                data, labels, idx = next(it)
            except StopIteration:
                break
            except BadImageError as e:
                raise unwrap_worker_error(e) from None
            except OSError as e:
                raise self.bad_file_error(getattr(e, "filename", None) or self.index.root, str(e)) from None
            images = self._decode(data, idx)
            if self.train:
                rng = numpy_generator(self.seed, epoch, self.rank, k)
                batch = self._augment(images, rng)
            else:
                batch = self._eval_transform(images)
            k += 1
            self.position = k
            yield self._finish(batch), labels.to(self.device, non_blocking=True)
        self._end_pass(epoch)
