"""The DALI backend: the files read in the epoch's order and fed to DALI, GPU JPEG decoding, augmentation inside DALI.

Training: each image's random-resized crop (area 0.08-1, aspect 3/4-4/3; torchvision's 10 tries, then a centre
crop) and flip are drawn on the CPU by :func:`teskd_fast.data.image_base.train_crops`, from the image size in
the file's header and the generator of (seed, epoch, rank, batch), as in the nvjpeg backend;
``fn.decoders.image_slice`` decodes that window only (on CUDA ``device="mixed"``: nvJPEG), then resize to
``image_size``, flip, normalise, NCHW or NHWC (channels_last) output. Evaluation: decode, resize the shorter
side to ``val_resize``, centre crop. EXIF orientation is not applied, as in the other backends. Without a GPU
(or with ``device="cpu"``) the same pipeline runs in DALI's CPU-only mode (``device_id=None``).

The pipeline is the module-level ``@pipeline_def`` function :func:`imagenet_pipeline`, as in DALI's examples,
with every setting an explicit argument. Its input is ``fn.external_source``, fed by :class:`_PassFeed`: each
pass hands it this rank's part of the epoch's global order (:func:`teskd_fast.data.common.epoch_order`, seeded
by ``(seed, epoch)``) from the starting batch on, and a thread pool reads the files a batch ahead. So an
epoch's images, their order and their crops depend only on the seed, the epoch and the rank (every rank
agrees, and a resume, at an epoch boundary or mid-epoch, reproduces the same batches), and shuffling is a true
permutation rather than DALI's buffer shuffle. The pipeline is built once and reused from pass to pass until
the image size changes (progressive resizing), as the torchvision backend keeps its DataLoader;
``pipelines_built`` counts the builds. nvJPEG's buffers are sized for ImageNet (:func:`decoder_arguments`).

DALI stops the whole pipeline on a file it cannot decode and its message often does not name the file. This
loader catches that, finds the file (from the message, else by decode-checking the batches in flight), and
raises :class:`teskd_fast.data.BadImageError` naming it and pointing to ``teskd-scan``; the pipeline is then
built anew for the next pass.
"""

import errno
import io
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from teskd_fast.data.common import DALI_STREAM, SCAN_HINT, BadImageError, derive_seed, numpy_generator
from teskd_fast.data.folder import open_regular
from teskd_fast.data.image_base import TRAIN_SCALE, ImageLoaderBase, pad_crops, pad_of, train_crops
from teskd_fast.data.jpeg import jpeg_frame

_DALI_HINT = ("install it with: pip install nvidia-dali-cuda130 (or the build matching your CUDA), "
              "or use backend='torchvision'")

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as e:  # imagenet_loaders checks first; this names the fix for a direct import
    raise ImportError(f"backend='dali' needs NVIDIA DALI ({e}); {_DALI_HINT}") from e

# nvJPEG's buffers, sized for ImageNet, whose images are mostly 500 x 375 or smaller (a few reach 6000 pixels
# a side). The hardware decoder preallocates for a batch of images up to HW_PREALLOCATE_SIDE a side; the
# hybrid path's buffers (one on the GPU and two pinned on the host per thread) hold an image of up to
# LARGE_IMAGE_SIDE a side. A larger image grows them when it comes. DALI's ImageNet example reserves for the
# largest image instead: 211 MB on the GPU and 2 x 141 MB pinned per thread, 1.7 GB and 2.25 GB per
# pipeline at 8 threads, on each rank.
HW_PREALLOCATE_SIDE = 512
LARGE_IMAGE_SIDE = 2048
# The share of the images given to the hardware JPEG decoder (A100 and later); the rest take the hybrid
# path on the pipeline's CPU threads, which the ranks of a node share. On ImageNet training DALI measured
# 0.9 against its default 0.65 at +1.8 % images/s, with a longer decode tail that the prefetch queue absorbs.
HW_DECODER_LOAD = 0.9


def decoder_arguments(mixed) -> dict[str, Any]:
    """Keyword arguments of the image decoders: RGB, no EXIF rotation, and on the GPU nvJPEG's buffer sizes.

    Args:
        mixed: decoding with ``device="mixed"`` (nvJPEG); the CPU decoder takes no buffer settings.
    """
    args = {"output_type": types.RGB, "adjust_orientation": False}
    if mixed:
        # One decoded RGB image of LARGE_IMAGE_SIDE a side.
        padding = 3 * LARGE_IMAGE_SIDE**2
        args.update(device_memory_padding=padding, host_memory_padding=padding, hw_decoder_load=HW_DECODER_LOAD,
                    preallocate_width_hint=HW_PREALLOCATE_SIDE, preallocate_height_hint=HW_PREALLOCATE_SIDE)
    return args


def dali_threads(world_size) -> int:
    """DALI's CPU threads per rank by default: the cores this process may use over the ranks on its node.

    The ranks on the node come from torchrun's ``LOCAL_WORLD_SIZE``; without it all ``world_size`` ranks are
    taken to share the node.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE") or world_size))
    return max(1, cores // max(1, local))


@pipeline_def
def imagenet_pipeline(*, source, train, image_size, val_resize, mean, std, channels_last, half,
                      mixed, pad_crop=False) -> tuple[Any, Any]:
    """One pass over an ImageFolder split as DALI decodes it: crop and augment or centre-crop, normalise.

    Called as ``imagenet_pipeline(batch_size=, num_threads=, device_id=, seed=, prefetch_queue_depth=, ...)``
    (``pipeline_def``'s arguments, then these).

    Args:
        source: ``fn.external_source``'s batch source (a :class:`_PassFeed`): per batch the encoded files
            (uint8 [N]) and labels (int32 [1]), for training also each crop's (top, left) and (height, width)
            (int32 [2]) and flip (int32 []); StopIteration ends a pass.
        train: crop the given window, resize it to ``image_size`` and flip it; otherwise resize the shorter
            side to ``val_resize`` and centre-crop ``image_size``.
        mean, std: per channel, in 0-255 units.
        channels_last: HWC output (else CHW). half: float16 output (else float32).
        mixed: decode on the GPU (``device="mixed"``, nvJPEG) and deliver the labels there; else the CPU.
        pad_crop: training decodes the whole image, resizes it to ``image_size`` square and takes the given window
            (anchors from -pad, zero outside the image) before the flip: the pad-crop augmentation.

    Returns:
        (images, labels): images [B, 3, S, S] (or [B, S, S, 3]) normalised, labels [B, 1] int32.
    """
    decoder = "mixed" if mixed else "cpu"
    layout = "HWC" if channels_last else "CHW"
    dtype = types.FLOAT16 if half else types.FLOAT
    if train and pad_crop:
        jpegs, labels, anchors, shapes, flips = fn.external_source(
            source=source, num_outputs=5, batch=True, dtype=[types.UINT8] + [types.INT32] * 4, ndim=[1, 1, 1, 1, 0])
        images = fn.decoders.image(jpegs, device=decoder, **decoder_arguments(mixed))
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
        images = fn.slice(images, anchors, shapes, axis_names="HW", normalized_anchor=False, normalized_shape=False,
                          out_of_bounds_policy="pad", fill_values=0)
        images = fn.crop_mirror_normalize(images, dtype=dtype, output_layout=layout, mean=mean, std=std, mirror=flips)
    elif train:
        jpegs, labels, anchors, shapes, flips = fn.external_source(
            source=source, num_outputs=5, batch=True, dtype=[types.UINT8] + [types.INT32] * 4, ndim=[1, 1, 1, 1, 0])
        images = fn.decoders.image_slice(jpegs, anchors, shapes, device=decoder, axis_names="HW",
                                         normalized_anchor=False, normalized_shape=False, **decoder_arguments(mixed))
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=dtype, output_layout=layout, mean=mean, std=std, mirror=flips)
    else:
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32],
                                           ndim=[1, 1])
        images = fn.decoders.image(jpegs, device=decoder, **decoder_arguments(mixed))
        images = fn.resize(images, resize_shorter=val_resize, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=dtype, output_layout=layout, mean=mean, std=std,
                                          crop=(image_size, image_size), crop_pos_x=0.5, crop_pos_y=0.5)
    return images, labels.gpu() if mixed else labels


def _image_size(data, path):
    """(height, width) from the header of the file content ``data``: the JPEG frame, else Pillow's header read."""
    frame = jpeg_frame(data)
    if frame is not None:
        return frame.height, frame.width
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    # Pillow reports an unreadable header as OSError (unknown format), SyntaxError or ValueError.
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(errno.EINVAL, f"not an image ({type(e).__name__}: {e})", path) from None


def _read_file(path, with_size):
    """The file's bytes (uint8 [N]) and, when ``with_size``, its image (height, width); OSError names the path."""
    with open_regular(path) as f:  # a FIFO, socket or device: an OSError naming it, never a blocked read
        data = f.read()
    return np.frombuffer(data, np.uint8), _image_size(data, path) if with_size else None


class _PassFeed:
    """The source of ``fn.external_source``: one pass's batches, their files read one batch ahead by threads.

    DALI calls it once per batch, ahead of use (its prefetch queue); StopIteration ends the pass.
    """

    def __init__(self, index, train, threads, loader=None):
        # loader: the DaliImageLoader whose augmentation (crop_scale, or pad-crop at its image size) training draws.
        self.index, self.train = index, train
        self.augment = getattr(loader, "augment", "rrc")
        self.crop_scale = getattr(loader, "crop_scale", TRAIN_SCALE)
        self.image_size = getattr(loader, "image_size", 0)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="teskd-dali-read")
        self._batches = iter(())
        self._ahead = None

    def start(self, batches):
        """Feed ``batches`` from the next call on: [(dataset indices, key tuple of the crop generator)]."""
        self._batches, self._ahead = iter(batches), None

    def close(self):
        """Stop the reading threads (the pipeline that calls this feed is being dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, batch):
        indices, keys = batch
        with_size = self.train and self.augment != "pad-crop"
        return indices, keys, [self._pool.submit(_read_file, self.index.path(i), with_size) for i in indices]

    def __call__(self):
        # next() raises StopIteration after the last batch: the end of the pass for DALI.
        indices, keys, reads = self._ahead if self._ahead is not None else self._submit(next(self._batches))
        following = next(self._batches, None)
        self._ahead = None if following is None else self._submit(following)
        files, sizes = zip(*(r.result() for r in reads), strict=True)
        # Batches of equal-shape samples go as one array each, with the batch as the outer dimension.
        labels = np.array([[self.index.samples[i][1]] for i in indices], np.int32)
        if not self.train:
            return list(files), labels
        rng = numpy_generator(*keys)
        if self.augment == "pad-crop":
            s, p = self.image_size, pad_of(self.image_size)
            crops = np.array([(dy - p, dx - p, s, s, flip) for dy, dx, flip in pad_crops(len(indices), s, rng)],
                             np.int32)
        else:
            crops = np.array(train_crops(sizes, rng, self.crop_scale), np.int32)  # [B, (top, left, h, w, flip)]
        anchors, shapes, flips = (np.ascontiguousarray(crops[:, cols]) for cols in (slice(0, 2), slice(2, 4), 4))
        return list(files), labels, anchors, shapes, flips


class _Pipeline(NamedTuple):
    image_size: int
    feed: _PassFeed
    iterator: DALIGenericIterator


class DaliImageLoader(ImageLoaderBase):
    """DALI pipeline over an indexed ImageFolder split (see the module docs). Built by ``imagenet_loaders``.

    ``workers`` sets DALI's CPU threads (default: :func:`dali_threads`); ``pipelines_built`` counts the
    pipelines built so far (one per image size, plus one after each error).
    """

    backend = "dali"

    def __init__(self, index, prefetch=2, **kwargs):
        threads = kwargs.get("workers")
        super().__init__(index, **kwargs)
        self.prefetch = prefetch
        self.threads = dali_threads(self.world_size) if threads is None else max(1, int(threads))
        self.pipelines_built = 0
        self._pipe = None
        # A pass left before its end: the batches DALI has in flight are run out before the next pass.
        self._open = False

    @property
    def mixed(self) -> bool:
        """True when DALI decodes on the GPU (device="mixed")."""
        return self.device.type == "cuda"

    def _build(self):
        """:func:`imagenet_pipeline` at the current image size, with its feed and its iterator."""
        feed = _PassFeed(self.index, self.train, self.threads, self)
        pipe = imagenet_pipeline(
            batch_size=self.batch_size, num_threads=self.threads, device_id=self.device.index if self.mixed else None,
            seed=derive_seed(self.seed, DALI_STREAM, self.rank) % 2**31, prefetch_queue_depth=self.prefetch,
            source=feed, train=self.train, image_size=self.image_size, val_resize=self.val_resize,
            mean=[255.0 * m for m in self.mean], std=[255.0 * s for s in self.std],
            channels_last=self.channels_last, half=self.dtype == torch.float16, mixed=self.mixed,
            pad_crop=self.augment == "pad-crop",
        )
        iterator = DALIGenericIterator([pipe], ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                       auto_reset=False, prepare_first_batch=False)
        self.pipelines_built += 1
        return _Pipeline(self.image_size, feed, iterator)

    def _drop(self):
        """Let the current pipeline go (a new image size, or a dead pipeline), with its feed's threads."""
        if self._pipe is not None:
            self._pipe.feed.close()
            self._pipe = None

    def _start(self, batches):
        """The DALI iterator of a pass over ``batches``, on the pipeline of the current image size."""
        if self._pipe is not None and self._pipe.image_size != self.image_size:
            self._drop()
        if self._pipe is not None and self._open:
            # The last pass was left early: run out its batches in flight (an error there: build anew).
            self._pipe.feed.start(())
            try:
                for _ in self._pipe.iterator:
                    pass
            except (RuntimeError, OSError):
                self._drop()
        if self._pipe is None:
            self._pipe = self._build()
            self._pipe.feed.start(batches)
        else:
            # The feed first: reset() asks it for the first batches of the new pass at once.
            self._pipe.feed.start(batches)
            self._pipe.iterator.reset()
        self._open = True
        return self._pipe.iterator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._begin_pass()
        if start >= len(self):
            self._end_pass(epoch)
            return
        b = self.batch_size
        mine = self.epoch_indices(epoch)[start * b :].tolist()
        batches = [(mine[j : j + b], (self.seed, epoch, self.rank, start + j // b))
                   for j in range(0, (len(self) - start) * b, b)]
        k = start
        error = iterator = None
        try:
            # Inside the try: from the second pass on, starting resets the pipeline, which already reads files.
            iterator = self._start(batches)
            for out in iterator:
                images, labels = out[0]["images"], out[0]["labels"]
                k += 1
                self.position = k
                yield (self._finish(images, normalised=True, layout="NHWC" if self.channels_last else "NCHW"),
                       labels.view(-1).to(self.device, torch.int64, non_blocking=True))
        except RuntimeError as e:
            # DALI reports a failed decode as a RuntimeError and the pipeline is dead: name the file instead.
            error = self._diagnose(e, mine, k - start)
        except OSError as e:
            # A file the feed could not read, or whose header is not an image's.
            error = self.bad_file_error(e.filename or self.index.root, e.strerror or str(e))
        self._open = False
        if error is not None:
            # Raised once the dead pipeline and its threads are released: no DALI traceback.
            del iterator
            self._drop()
            raise error
        self._end_pass(epoch)

    def _diagnose(self, error, mine, done):
        """A BadImageError naming the file behind DALI's ``error`` (``mine``: this pass's images in order)."""
        from teskd_fast.data.scan import check_image

        text = str(error)
        detail = " ".join(line.strip() for line in text.split("encountered:")[-1].splitlines()
                          if line.strip() and "no longer valid" not in line)[:300]
        samples = self.index.samples
        # 1. DALI names the sample in some messages ("Failed to decode sample #3 : cls/x.JPEG").
        for match in re.finditer(r"sample #\d+ ?: ?(\S[^\n]*)", text):
            named = match.group(1).strip()
            for i in mine:
                if named.endswith(samples[i][0]):
                    return self.bad_file_error(self.index.path(i), f"DALI could not decode it ({detail})")
        # 2. Otherwise the file is in one of the batches in flight: decode-check them.
        window = mine[done * self.batch_size : (done + self.prefetch + 2) * self.batch_size]
        for i in window:
            reason = check_image(self.index.path(i), formats=("JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP"))
            if reason is not None:
                return self.bad_file_error(self.index.path(i), f"{reason} (DALI: {detail})")
        # No file of the batches in flight is bad by itself: still the data's problem (exit status 1), not ours.
        return BadImageError(f"DALI stopped while reading {self.index.root} near batch {done}: {detail}; "
                             f"{SCAN_HINT.format(root=self.index.root.parent)}")
