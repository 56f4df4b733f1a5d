"""The DALI backend: ``fn.readers.file`` sharded by rank, GPU JPEG decoding, augmentation inside DALI.

Training: ``fn.decoders.image_random_crop`` (area 0.08-1, aspect 3/4-4/3; on CUDA ``device="mixed"``, which
decodes only the crop window with nvJPEG), resize to ``image_size``, random flip, normalise, NCHW or NHWC
(channels_last) output. Evaluation: decode, resize the shorter side to ``val_resize``, centre crop.
Without a GPU (or with ``device="cpu"``) the same pipeline runs in DALI's CPU-only mode (``device_id=None``).

The pipeline is the module-level ``@pipeline_def`` function :func:`imagenet_pipeline`, as in DALI's examples,
with every setting an explicit argument. The loader builds it once per epoch over a file list it writes: the
epoch's global order (:func:`teskd_fast.data.common.epoch_order`, seeded by ``(seed, epoch)``), read with
``shard_id=rank`` and ``num_shards=world_size``. So an epoch's images and their order depend only on the seed
and the epoch (every rank agrees, a resume reproduces them), the resolution can change between epochs
(progressive resizing), and shuffling is a true permutation rather than DALI's buffer shuffle. DALI's random
crops and flips follow the pipeline seed, derived from (seed, epoch, rank); a mid-epoch resume yields the same
remaining images.

DALI stops the whole pipeline on a file it cannot decode and its message often does not name the file. This
loader catches that, finds the file (from the message, else by decode-checking the batches in flight), and
raises :class:`teskd_fast.data.BadImageError` naming it and pointing to ``teskd-scan``.
"""

import os
import re
import shutil
import tempfile
import weakref

import torch

from teskd_fast.data.common import DALI_STREAM, SCAN_HINT, derive_seed, epoch_order, shard_bounds
from teskd_fast.data.image_base import TRAIN_RATIO, TRAIN_SCALE, ImageLoaderBase

_DALI_HINT = ("install it with: pip install nvidia-dali-cuda130 (or the build matching your CUDA), "
              "or use backend='torchvision'")

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as e:  # imagenet_loaders checks first; this names the fix for a direct import
    raise ImportError(f"backend='dali' needs NVIDIA DALI ({e}); {_DALI_HINT}") from e

# nvJPEG's buffer sizes recommended in DALI's ImageNet examples (they avoid re-allocations on the GPU).
NVJPEG_DEVICE_PADDING = 211025920
NVJPEG_HOST_PADDING = 140544512
# Tries of the random-resized crop before it falls back to the whole image.
CROP_ATTEMPTS = 100


@pipeline_def
def imagenet_pipeline(*, file_root, file_list, shard_id, num_shards, train, image_size, val_resize, mean, std,
                      channels_last, half, mixed):
    """One epoch of an ImageFolder split as DALI reads it: decode, augment or centre-crop, normalise.

    Called as ``imagenet_pipeline(batch_size=, num_threads=, device_id=, seed=, prefetch_queue_depth=, ...)``
    (``pipeline_def``'s arguments, then these).

    Args:
        file_root, file_list: the split folder and a list of ``relative/path label`` lines in reading order.
        shard_id, num_shards: this reader's contiguous part of the list.
        train: random-resized crop (area 0.08-1, aspect 3/4-4/3) to ``image_size`` and a random flip;
            otherwise resize the shorter side to ``val_resize`` and centre-crop ``image_size``.
        mean, std: per channel, in 0-255 units.
        channels_last: HWC output (else CHW). half: float16 output (else float32).
        mixed: decode on the GPU (``device="mixed"``, nvJPEG) and deliver the labels there; else the CPU.

    Returns:
        (images, labels): images [B, 3, S, S] (or [B, S, S, 3]) normalised, labels [B, 1] int32.
    """
    decoder = "mixed" if mixed else "cpu"
    nvjpeg = dict(device_memory_padding=NVJPEG_DEVICE_PADDING, host_memory_padding=NVJPEG_HOST_PADDING) if mixed \
        else {}
    layout = "HWC" if channels_last else "CHW"
    dtype = types.FLOAT16 if half else types.FLOAT
    jpegs, labels = fn.readers.file(file_root=file_root, file_list=file_list, shard_id=shard_id,
                                    num_shards=num_shards, random_shuffle=False, stick_to_shard=True,
                                    pad_last_batch=True, name="Reader")
    if train:
        images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                               random_area=list(TRAIN_SCALE), random_aspect_ratio=list(TRAIN_RATIO),
                                               num_attempts=CROP_ATTEMPTS, **nvjpeg)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=dtype, output_layout=layout, mean=mean, std=std,
                                          mirror=fn.random.coin_flip(probability=0.5))
    else:
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **nvjpeg)
        images = fn.resize(images, resize_shorter=val_resize, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=dtype, output_layout=layout, mean=mean, std=std,
                                          crop=(image_size, image_size), crop_pos_x=0.5, crop_pos_y=0.5)
    return images, labels.gpu() if mixed else labels


class DaliImageLoader(ImageLoaderBase):
    """DALI pipeline over an indexed ImageFolder split (see the module docs). Built by ``imagenet_loaders``."""

    backend = "dali"

    def __init__(self, index, prefetch=2, **kwargs):
        super().__init__(index, **kwargs)
        self.prefetch = prefetch
        self._tmpdir = tempfile.mkdtemp(prefix="teskd_dali_")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)

    @property
    def mixed(self):
        """True when DALI decodes on the GPU (device="mixed")."""
        return self.device.type == "cuda"

    def _file_list(self, epoch, start):
        """Write the epoch's list; returns (path, shard_id, num_shards, this rank's images in order)."""
        order, _ = epoch_order(self.num_images, shuffle=self.train, seed=self.seed, epoch=epoch,
                               rank=self.rank, world_size=self.world_size, equal_shards=self.train)
        order = order.tolist()
        skip = start * self.batch_size
        if skip:
            # Resume inside an epoch: this rank's shard without its first `skip` images, read as one shard.
            lo, hi = shard_bounds(len(order), self.rank, self.world_size)
            order, shard_id, num_shards = order[lo + skip : hi], 0, 1
        else:
            shard_id, num_shards = self.rank, self.world_size
        path = os.path.join(self._tmpdir, f"{'train' if self.train else 'val'}_{self.rank}.txt")
        samples = self.index.samples
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{samples[i][0]} {samples[i][1]}\n" for i in order)
        lo, hi = shard_bounds(len(order), shard_id, num_shards)
        return path, shard_id, num_shards, order[lo:hi]

    def _pipeline(self, file_list, shard_id, num_shards, epoch):
        """The epoch's :func:`imagenet_pipeline`, seeded by (seed, epoch, rank)."""
        return imagenet_pipeline(
            batch_size=self.batch_size, num_threads=max(1, self.workers),
            device_id=self.device.index if self.mixed else None,
            seed=derive_seed(self.seed, epoch, DALI_STREAM, self.rank) % 2**31, prefetch_queue_depth=self.prefetch,
            file_root=str(self.index.root), file_list=file_list, shard_id=shard_id, num_shards=num_shards,
            train=self.train, image_size=self.image_size, val_resize=self.val_resize,
            mean=[255.0 * m for m in self.mean], std=[255.0 * s for s in self.std],
            channels_last=self.channels_last, half=self.dtype == torch.float16, mixed=self.mixed,
        )

    def __iter__(self):
        epoch, start = self._begin_pass()
        if start >= len(self):
            self._end_pass(epoch)
            return
        file_list, shard_id, num_shards, mine = self._file_list(epoch, start)
        pipe = self._pipeline(file_list, shard_id, num_shards, epoch)
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        k = start
        error = None
        iterator = None
        try:
            iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader",
                                           last_batch_policy=policy, auto_reset=False, prepare_first_batch=False)
            for out in iterator:
                images, labels = out[0]["images"], out[0]["labels"]
                k += 1
                self.position = k
                yield (self._finish(images, normalised=True, layout="NHWC" if self.channels_last else "NCHW"),
                       labels.view(-1).to(self.device, torch.int64, non_blocking=True))
        except RuntimeError as e:
            # DALI reports a failed decode as a RuntimeError and the pipeline is dead: name the file instead.
            error = self._diagnose(e, mine, k - start)
        # Raised outside the handler, once the dead pipeline and its threads are released: no DALI traceback.
        del iterator, pipe
        if error is not None:
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
        return RuntimeError(f"DALI stopped while reading {self.index.root} near batch {done}: {detail}; "
                            f"{SCAN_HINT.format(root=self.index.root.parent)}")
