"""The nvjpeg backend: CPU workers read file bytes, the GPU decodes a whole batch and augments it.

``torchvision.io.decode_jpeg(list_of_bytes, device="cuda")`` decodes the batch with nvJPEG, ordered against
the current CUDA stream (see ``_decode_ordered``). A JPEG whose header says nvJPEG cannot take it (CMYK, see
:func:`needs_cpu_decode`) is decoded by the worker that read it, with the torchvision backend's Pillow loader;
a file the batch call rejects is retried alone, then on the CPU, and a file nothing can decode stops the run
with :class:`teskd_fast.data.BadImageError` naming it. A batch call that fails is a slow path (one decode call per
file, some on the CPU): the loader warns the first time, with the error, and counts them in ``decode_fallbacks``
(batch calls that failed) and ``cpu_decoded_images`` (images the CPU decoded after the GPU refused them).
Training: torchvision's RandomResizedCrop parameters (area 0.08-1, aspect 3/4-4/3, 10 tries, then a centre crop)
drawn from a generator seeded by (seed, epoch, rank, batch), an antialiased bilinear resize of each crop on the GPU,
and a flip with p = 0.5; evaluation: resize the shorter side to ``val_resize``, centre crop. The per-batch seeds
make a mid-epoch resume exact.

``imagenet_loaders`` accepts this backend only with a CUDA device. The class itself takes
``decode_device="cpu"`` so that the same code (batching, crops, error handling) is tested on machines
without a GPU; only the decode call then runs on the CPU.
"""

import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from teskd_fast.data.common import SCAN_HINT, BadImageError, numpy_generator
from teskd_fast.data.folder import open_regular
from teskd_fast.data.image_base import (
    ImageLoaderBase,
    ListSampler,
    pad_crops,
    pad_of,
    train_crops,
    unwrap_worker_error,
    workers_iterator,
)
from teskd_fast.data.jpeg import jpeg_frame
from teskd_fast.data.torchvision_loader import _pil_loader

# nvJPEG through torchvision decodes 8-bit baseline (SOF0) and progressive (SOF2) JPEGs of 1 or 3 components.
_GPU_MARKERS = (0xC0, 0xC2)


def needs_cpu_decode(data) -> bool:
    """Whether the file content ``data`` (bytes) is a JPEG that torchvision's CUDA ``decode_jpeg`` does not take.

    Read from the JPEG header: True for a CMYK or YCCK JPEG (4 components; torchvision does not enable nvJPEG's
    CMYK output), a 12-bit, lossless or arithmetic-coded one. False for the JPEGs nvJPEG decodes and for
    anything that is not a JPEG (the batch decode then names the file as undecodable).
    """
    frame = jpeg_frame(data)
    if frame is None:
        return False
    return not (frame.marker in _GPU_MARKERS and frame.precision == 8 and frame.components in (1, 3))


class _FileBytes(torch.utils.data.Dataset):
    """(data, label, index) for each sample of the index; data: the file bytes, or the image when decoded here.

    A JPEG that the GPU decoder does not take (:func:`needs_cpu_decode`; CMYK above all) is decoded in this
    worker by the torchvision backend's Pillow loader, so it becomes the same RGB image as there: a uint8
    [3, H, W] tensor. Everything else stays file bytes (uint8 [N]) for the batch decode on the GPU.
    """

    def __init__(self, index):
        self.index = index

    def __len__(self):
        return len(self.index.samples)

    def __getitem__(self, i):
        path = self.index.path(i)
        try:
            with open_regular(path) as f:
                raw = f.read()
        except OSError as e:  # raised in a worker: a BadImageError travels back with its message intact
            raise BadImageError(f"cannot read {path}: {e.strerror or e}; "
                                f"{SCAN_HINT.format(root=self.index.root.parent)}") from None
        if needs_cpu_decode(raw):
            from torchvision.transforms.functional import pil_to_tensor

            return pil_to_tensor(_pil_loader(path, self.index.root.parent)), self.index.samples[i][1], i
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8), self.index.samples[i][1], i


def _collate(batch):
    data, labels, idx = zip(*batch, strict=True)
    return list(data), torch.tensor(labels, dtype=torch.int64), list(idx)


class NvjpegImageLoader(ImageLoaderBase):
    """Batched GPU JPEG decoding with torchvision (see the module docs). Built by ``imagenet_loaders``."""

    backend = "nvjpeg"

    def __init__(self, index, decode_device=None, **kwargs):
        super().__init__(index, **kwargs)
        self.decode_device = self.device if decode_device is None else torch.device(decode_device)
        # The slow path's counts (see the module docs); the benchmarks report them.
        self.decode_fallbacks = 0
        self.cpu_decoded_images = 0
        # The stream the GPU decode allocates its outputs on (see _decode_ordered).
        self._decode_stream = torch.cuda.Stream(self.decode_device) if self.decode_device.type == "cuda" else None
        self._sampler = ListSampler()
        workers = self.workers
        self._loader = torch.utils.data.DataLoader(
            _FileBytes(index), batch_size=self.batch_size, sampler=self._sampler, num_workers=workers,
            collate_fn=_collate, drop_last=self.drop_last, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def _decode(self, data, idx):
        """The batch's images in order, uint8 [3, H, W] each on ``decode_device``."""
        # The worker decoded the JPEGs the GPU decoder does not take ([3, H, W]); the others are file bytes ([N]).
        images = [d.to(self.decode_device) if d.dim() == 3 else None for d in data]
        todo = [n for n, d in enumerate(data) if d.dim() == 1]
        if todo:
            with warnings.catch_warnings():
                # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they still work.
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = self._decode_ordered([data[n] for n in todo], [idx[n] for n in todo])
            for n, img in zip(todo, decoded, strict=True):
                images[n] = img
        return images

    def _decode_ordered(self, data, idx):
        """:meth:`_decode_batch`, ordered against the current CUDA stream (on the CPU: the call alone).

        torchvision's CUDA ``decode_jpeg`` (0.26 to 0.29; pytorch/vision#9606) allocates its outputs while the
        caller's stream is current, then writes them from nvJPEG's own stream, which never waits for the caller's.
        The caching allocator hands out a block as soon as it is freed on its stream, so a block the training step
        has just freed, with kernels still queued on it, can be decoded into and then overwritten by those kernels
        (or overwrite what they read). So the decode runs with a side stream current: the allocator gives
        side-stream blocks to side-stream allocations only, and only once every use recorded with ``record_stream``
        has finished on the GPU. The decoder then never writes memory a queued kernel uses, with no wait on the
        current stream (which nvJPEG's hardware path would not honour anyway: its batched decode has been seen
        writing before the work queued ahead of it on its stream ran). ``decode_jpeg`` synchronises its own stream
        before returning; ``current.wait_stream(side)`` orders the consumers after the side stream's own work (the
        CPU retry's copy). The cudaMallocAsync allocator moves blocks between streams behind stream dependencies
        that nvJPEG's stream ignores: with it, the device is synchronised.
        """
        if self.decode_device.type != "cuda":
            return self._decode_batch(data, idx)
        if torch.cuda.get_allocator_backend() == "cudaMallocAsync":
            torch.cuda.synchronize(self.decode_device)
        current = torch.cuda.current_stream(self.decode_device)
        with torch.cuda.stream(self._decode_stream):
            images = self._decode_batch(data, idx)
        current.wait_stream(self._decode_stream)
        for img in images:
            img.record_stream(current)
        return images

    def _decode_batch(self, data, idx):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.decode_device)
        except RuntimeError as e:
            batch_error = e
        # The batch call failed: retry one by one, then on the CPU, to decode the good ones and name the bad one.
        self.decode_fallbacks += 1
        if self.decode_fallbacks == 1:
            first = str(batch_error).strip().splitlines()[0] if str(batch_error).strip() else type(batch_error).__name__
            warnings.warn(f"nvjpeg loader: the batch decode on {self.decode_device} failed ({first}); decoding this "
                          "batch one file at a time, on the CPU where the GPU refuses a file. Later fallbacks are "
                          "counted in the loader's decode_fallbacks and cpu_decoded_images, without a warning",
                          RuntimeWarning, stacklevel=2)
        out = []
        for d, i in zip(data, idx, strict=True):
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.decode_device))
                continue
            except RuntimeError as e:
                gpu_error = e
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB).to(self.decode_device))
                self.cpu_decoded_images += 1
            except RuntimeError as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else str(gpu_error)
                raise self.bad_file_error(self.index.path(i), f"not a decodable JPEG ({reason})") from None
        return out

    def _augment(self, images, rng):
        s = self.image_size
        out = torch.empty(len(images), 3, s, s, device=self.decode_device)
        if self.augment == "pad-crop":
            p = pad_of(s)
            for n, (img, (dy, dx, flip)) in enumerate(zip(images, pad_crops(len(images), s, rng), strict=True)):
                img = F.interpolate(img[None].float(), size=(s, s), mode="bilinear", antialias=True,
                                    align_corners=False)
                crop = F.pad(img, (p, p, p, p))[0, :, dy : dy + s, dx : dx + s]
                out[n] = crop.flip(-1) if flip else crop
            return out
        crops = train_crops([img.shape[1:] for img in images], rng, self.crop_scale)
        for n, (img, (top, left, h, w, flip)) in enumerate(zip(images, crops, strict=True)):
            crop = img[None, :, top : top + h, left : left + w].float()
            crop = F.interpolate(crop, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            out[n] = crop[0].flip(-1) if flip else crop[0]
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._begin_pass()
        self._sampler.indices = self.epoch_indices(epoch)[start * self.batch_size :].tolist()
        k = start
        it = workers_iterator(self._loader)
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
