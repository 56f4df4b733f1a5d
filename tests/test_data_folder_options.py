"""Folder data options: the normalisation given or computed from the training set, the crop's area range, and the
pad-crop augmentation (CIFAR's) for small images, on every backend and through teskd-train's flags."""

import importlib.util

import numpy as np
import pytest
import torch

from teskd_fast.data import imagenet_loaders
from teskd_fast.data.catalog import LoaderRequest, folder_defaults
from teskd_fast.data.common import numpy_generator
from teskd_fast.data.folder import index_image_folder
from teskd_fast.data.image_base import pad_crops, train_crops
from teskd_fast.data.nvjpeg import NvjpegImageLoader
from teskd_fast.train.config import ConfigError, resolve

pytestmark = pytest.mark.timeout(120)
needs_dali = pytest.mark.skipif(
    importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None,
    reason="DALI is not installed (pip install -e '.[dali]')",
)
COLOURS = [(200, 40, 10), (10, 120, 250), (60, 60, 60), (250, 250, 0)]


def _solid_folder(root, fmt):
    """train/val with two classes of two solid-colour 12 x 12 images each."""
    from PIL import Image

    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (12, 12), COLOURS[2 * c + k]).save(root / split / name / f"{k}.{fmt.lower()}",
                                                                     format=fmt)
    return root


@pytest.fixture(scope="module")
def solid(tmp_path_factory):
    """PNGs (lossless: the colours stay exact)."""
    return _solid_folder(tmp_path_factory.mktemp("solid"), "PNG")


@pytest.fixture(scope="module")
def solid_jpeg(tmp_path_factory):
    """JPEGs, which every backend reads (nvjpeg too)."""
    return _solid_folder(tmp_path_factory.mktemp("solid_jpeg"), "JPEG")


def test_the_mean_and_std_computed_from_the_training_images(solid):
    train, val = imagenet_loaders(solid, batch_size=4, backend="torchvision", image_size=12, val_resize=12,
                                  device="cpu", workers=0, mean="data")
    colours = np.array(COLOURS, np.float64) / 255
    assert train.mean == val.mean == pytest.approx(tuple(colours.mean(0)), abs=1e-9)
    assert train.std == pytest.approx(tuple(colours.std(0)), abs=1e-6)
    # Each evaluation image is its colour, standardised with those statistics.
    x = torch.cat([b for b, _ in val]).double()
    expected = torch.from_numpy((colours - colours.mean(0)) / colours.std(0))
    torch.testing.assert_close(x.mean((2, 3)), expected, rtol=0, atol=1e-5)


def test_a_given_mean_and_std(solid):
    train, _ = imagenet_loaders(solid, batch_size=4, backend="torchvision", image_size=12, val_resize=12,
                                device="cpu", workers=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.cat([b for b, _ in train])
    assert x.min() >= -2 - 1e-6 and x.max() <= 2 + 1e-6 and x.min() < -1.5  # (0 - 0.5) / 0.25 = -2 from a colour
    with pytest.raises(ValueError, match="mean and std: 3 values"):
        imagenet_loaders(solid, batch_size=4, backend="torchvision", device="cpu", mean=(0.5,), std=(0.2,))


def test_the_crop_scale_bounds_the_crop_area():
    rng = np.random.default_rng(0)
    crops = train_crops([(100, 100)] * 200, rng, scale=(0.5, 0.6))
    areas = np.array([h * w for _, _, h, w, _ in crops]) / 100**2
    assert areas.min() > 0.45 and areas.max() < 0.65


def _nvjpeg(root, **kw):
    index = index_image_folder(root / "train", use_scan=False)
    return NvjpegImageLoader(index, decode_device="cpu", train=True, batch_size=4, image_size=16, device="cpu",
                             workers=0, seed=5, **kw)


def _fill_mask(batch, fill):
    """[B, 16, 16] True where every channel holds the zero padding's normalised value."""
    return (batch - fill[None, :, None, None]).abs().amax(1) < 1e-4


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "nvjpeg", "torchvision"])
def test_pad_crop_pads_with_zeros_and_crops_back(solid_jpeg, backend):
    # Solid images: a pad-crop is the colour with a zero border of dy / dx rows and columns where the crop slid off.
    if backend == "nvjpeg":
        loader = _nvjpeg(solid_jpeg, augment="pad-crop")
    else:
        loader = imagenet_loaders(solid_jpeg, batch_size=4, backend=backend, image_size=16, val_resize=16, device="cpu",
                                  workers=1, seed=5, augment="pad-crop")[0]
    fill = -torch.tensor(loader.mean) / torch.tensor(loader.std)
    batch = torch.cat([b for b, _ in loader])
    assert batch.shape == (4, 3, 16, 16)
    masks = _fill_mask(batch, fill)
    assert masks.any() and not masks.all(1).all(1).any(), "no padding, or an image of padding only"
    for mask in masks:
        # The padding is whole rows and columns at the edges (at most 2 = 16 // 8 of each).
        rows, cols = mask.all(1), mask.all(0)
        assert torch.equal(mask, rows[:, None] | cols[None, :])
        assert rows.sum() <= 2 and cols.sum() <= 2
    if backend != "torchvision":
        # nvjpeg and DALI draw the same offsets from (seed, epoch, rank, batch).
        epoch_order = loader.epoch_indices(0)
        draws = pad_crops(len(epoch_order), 16, numpy_generator(5, 0, 0, 0))
        for mask, (dy, dx, _) in zip(masks, draws, strict=False):
            assert int(mask.all(1)[:2].sum() + mask.all(1)[-2:].sum()) == abs(dy - 2)
            assert int(mask.all(0)[:2].sum() + mask.all(0)[-2:].sum()) == abs(dx - 2)


def test_folder_defaults_fit_the_image_size_and_the_flags_reach_the_loaders():
    assert folder_defaults(32) == ("pad-crop", (0.25, 1.0))
    assert folder_defaults(96) == ("rrc", (0.25, 1.0))
    assert folder_defaults(224) == ("rrc", (0.08, 1.0))
    cfg = resolve({"dataset": "folder", "norm_mean": [0.5, 0.4, 0.3], "norm_std": [0.2, 0.2, 0.2],
                   "crop_scale": [0.3, 1], "folder_augment": "rrc"})
    assert cfg.norm_mean == (0.5, 0.4, 0.3) and cfg.crop_scale == (0.3, 1.0)
    assert {"norm_mean", "norm_std", "norm_from_data", "crop_scale", "augment"} <= set(
        LoaderRequest.__dataclass_fields__)
    for bad, phrase in (({"norm_mean": [0.5], "norm_std": [0.2]}, "--norm-mean and --norm-std: .*3 values"),
                        ({"norm_mean": [0.5] * 3}, "both or neither"),
                        ({"norm_from_data": True, "norm_mean": [0.5] * 3, "norm_std": [0.2] * 3}, "computes"),
                        ({"crop_scale": [0.5, 0.2]}, "--crop-scale")):
        with pytest.raises(ConfigError, match=phrase):
            resolve(bad)


def test_teskd_train_flags_reach_the_folder_loaders(solid):
    from teskd_fast.train.build import build_data
    from teskd_fast.train.distributed import DistEnv

    def built(image_size, **flags):
        cfg = resolve({"dataset": "folder", "data_dir": str(solid), "loader": "torchvision", "workers": 0,
                       "batch_size": 4, "image_size": image_size, "val_resize": image_size,
                       "val_image_size": image_size, **flags})
        train, val, classes = build_data(cfg, DistEnv(), channels_last=False)
        assert classes == 2
        return train

    small = built(12)
    assert (small.augment, small.crop_scale) == ("pad-crop", (0.25, 1.0)) and small.mean == (0.485, 0.456, 0.406)
    given = built(96, norm_mean=[0.5, 0.4, 0.3], norm_std=[0.2, 0.2, 0.2], crop_scale=[0.3, 0.9],
                  folder_augment="rrc")
    assert (given.augment, given.crop_scale, given.mean, given.std) == ("rrc", (0.3, 0.9), (0.5, 0.4, 0.3),
                                                                        (0.2, 0.2, 0.2))
    colours = np.array(COLOURS, np.float64) / 255
    assert built(12, norm_from_data=True).mean == pytest.approx(tuple(colours.mean(0)), abs=1e-9)
