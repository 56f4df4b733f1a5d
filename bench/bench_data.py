"""Data loader throughput, each figure beside its baseline from the same run.

- CIFAR training pass: the device-resident loader vs torchvision's DataLoader with the same augmentations
  (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) and 2 workers (the baseline).
- ImageNet training pass over a generated folder of real JPEG files of ImageNet-like sizes: DALI (GPU decoding
  on CUDA, CPU-only mode otherwise) and nvjpeg (CUDA only) vs torchvision's ImageFolder + DataLoader (baseline).

``extra_info["images_per_s"]`` holds the throughput of each row; the summary table gives the ratios.
"""

import numpy as np
import pytest
import torch
from common import record, sync

from teskd_fast.data import CIFAR_MEAN, CIFAR_STD, CifarLoader, imagenet_loaders

HAS_CUDA = torch.cuda.is_available()
CIFAR_N = 10_000
CIFAR_BATCH = 128
IMAGENET_N = 192
IMAGENET_BATCH = 64


def _dali_installed():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def cifar_split():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (CIFAR_N, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 100, (CIFAR_N,), generator=g)


class _TorchvisionCifar(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR100 does per sample: a PIL image, then the transforms."""

    def __init__(self, images, labels):
        from torchvision import transforms

        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC, as torchvision stores CIFAR
        self.labels = labels.tolist()
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
            ]
        )

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def _drain(loader, device):
    n = 0
    for _, y in loader:
        n += len(y)
    sync(device)
    return n


def _run(benchmark, loader, device, n, rounds=3):
    _drain(loader, device)
    benchmark.pedantic(_drain, args=(loader, device), rounds=rounds, iterations=1)
    benchmark.extra_info["images_per_s"] = n / benchmark.stats.stats.median


def test_cifar_torchvision_dataloader_2_workers(benchmark, cifar_split):
    images, labels = cifar_split
    loader = torch.utils.data.DataLoader(
        _TorchvisionCifar(images, labels), batch_size=CIFAR_BATCH, shuffle=True, num_workers=2, persistent_workers=True
    )
    record(
        benchmark,
        f"data-cifar-train-{CIFAR_N}x{CIFAR_BATCH}-cpu",
        "torchvision DataLoader (2 workers)",
        "cpu",
        baseline=True,
        images=CIFAR_N,
        dtype=torch.float32,
        shape=[CIFAR_BATCH, 3, 32, 32],
    )
    _run(benchmark, loader, "cpu", CIFAR_N)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cifar_resident_loader_cpu(benchmark, cifar_split, channels_last):
    # Batches are made in chunks whose ops each run on the calling thread (torch's thread count untouched).
    loader = CifarLoader(
        *cifar_split,
        batch_size=CIFAR_BATCH,
        train=True,
        device="cpu",
        channels_last=channels_last,
    )
    name = "teskd_fast CifarLoader" + (" channels_last" if channels_last else "")
    record(
        benchmark,
        f"data-cifar-train-{CIFAR_N}x{CIFAR_BATCH}-cpu",
        name,
        "cpu",
        images=CIFAR_N,
        dtype=torch.float32,
        shape=[CIFAR_BATCH, 3, 32, 32],
    )
    _run(benchmark, loader, "cpu", CIFAR_N)


@pytest.mark.smoke
def test_cifar_resident_loader_smoke(benchmark, cifar_split):
    images, labels = cifar_split
    loader = CifarLoader(images[:1024], labels[:1024], batch_size=CIFAR_BATCH, train=True, device="cpu")
    record(
        benchmark,
        f"data-cifar-train-1024x{CIFAR_BATCH}-cpu-smoke",
        "teskd_fast CifarLoader",
        "cpu",
        baseline=True,
        images=1024,
        dtype=torch.float32,
        shape=[CIFAR_BATCH, 3, 32, 32],
    )
    _run(benchmark, loader, "cpu", 1024, rounds=1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="the GPU-resident CIFAR loader needs a CUDA device (target: >= 100k images/s)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cifar_resident_loader_cuda(benchmark, dtype):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g)
    loader = CifarLoader(
        images,
        torch.randint(0, 100, (50_000,)),
        batch_size=CIFAR_BATCH,
        train=True,
        device="cuda",
        channels_last=True,
        dtype=dtype,
    )
    record(
        benchmark,
        f"data-cifar-train-50000x{CIFAR_BATCH}-cuda",
        f"teskd_fast CifarLoader {dtype}",
        "cuda",
        baseline=dtype == torch.float32,
        images=50_000,
        dtype=dtype,
        shape=[CIFAR_BATCH, 3, 32, 32],
    )
    _run(benchmark, loader, "cuda", 50_000, rounds=5)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """Real JPEG files of ImageNet-like sizes (shorter side 300-500, aspect 3/4-4/3 about, quality 90)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet_bench")
    rng = np.random.default_rng(0)
    for split, n in (("train", IMAGENET_N), ("val", 8)):
        for i in range(n):
            h, w = (int(v) for v in rng.integers(300, 500, 2))
            y, x = np.mgrid[0:h, 0:w]
            img = np.stack([x * 255 / w, y * 255 / h, (x * y) % 256], -1) + rng.normal(0, 12, (h, w, 3))
            folder = root / split / f"class_{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.JPEG", quality=90)
    return root


def _imagenet(benchmark, root, backend, device, baseline=False, workers=2):
    train, _ = imagenet_loaders(
        root, batch_size=IMAGENET_BATCH, backend=backend, image_size=224, device=device, workers=workers
    )
    record(
        benchmark,
        f"data-imagenet-train-{IMAGENET_N}x{IMAGENET_BATCH}-224-{device}",
        f"{backend} ({workers} {'threads' if backend == 'dali' else 'workers'})",
        device,
        baseline=baseline,
        images=train.num_samples,
        dtype=torch.float32,
        shape=[IMAGENET_BATCH, 3, 224, 224],
    )
    _run(benchmark, train, device, train.num_samples)
    if backend == "nvjpeg":
        # The slow path (a batch decoded file by file, some on the CPU): a figure with fallbacks is not nvJPEG's.
        benchmark.extra_info.update(decode_fallbacks=train.decode_fallbacks,
                                    cpu_decoded_images=train.cpu_decoded_images)


@pytest.mark.parametrize("device", ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else []))
def test_imagenet_torchvision(benchmark, jpeg_folder, device):
    _imagenet(benchmark, jpeg_folder, "torchvision", device, baseline=True)


@pytest.mark.skipif(not _dali_installed(), reason="NVIDIA DALI is not installed")
@pytest.mark.parametrize("device", ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else []))
def test_imagenet_dali(benchmark, jpeg_folder, device):
    _imagenet(benchmark, jpeg_folder, "dali", device)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="the nvjpeg backend decodes on the GPU: needs a CUDA device")
def test_imagenet_nvjpeg(benchmark, jpeg_folder):
    _imagenet(benchmark, jpeg_folder, "nvjpeg", "cuda")
