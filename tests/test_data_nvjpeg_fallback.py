"""The nvjpeg loader's slow path: a batch decode that fails is warned about once and counted (issue 19, 6e)."""

import warnings

import numpy as np
import pytest
import torch

from teskd_fast.data import BadImageError
from teskd_fast.data.folder import index_image_folder
from teskd_fast.data.nvjpeg import NvjpegImageLoader

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


@pytest.fixture
def loader_and_bytes(tmp_path, request):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        folder = tmp_path / "train" / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG", quality=90)
    index = index_image_folder(tmp_path / "train")
    loader = NvjpegImageLoader(index, decode_device=request.param, device=request.param, train=True, batch_size=3,
                               image_size=32, workers=0)
    good = [torch.frombuffer(bytearray(open(index.path(i), "rb").read()), dtype=torch.uint8) for i in range(3)]
    return loader, good


@pytest.mark.parametrize("loader_and_bytes", DEVICES, indirect=True)
def test_a_failed_batch_decode_is_warned_once_and_counted(loader_and_bytes):
    loader, good = loader_and_bytes
    assert (loader.decode_fallbacks, loader.cpu_decoded_images) == (0, 0)
    assert len(loader._decode_batch(good, [0, 1, 2])) == 3
    assert loader.decode_fallbacks == 0
    # A file that starts as a JPEG and is not one: the batch call fails, the file-by-file retry names it.
    spoilt = torch.tensor([0xFF, 0xD8, 0xFF, 0xE0] + [7] * 60, dtype=torch.uint8)
    with pytest.warns(RuntimeWarning, match=r"nvjpeg loader: the batch decode on .* failed .*decode_fallbacks"):
        with pytest.raises(BadImageError, match=r"1\.JPEG.*not a decodable JPEG"):
            loader._decode_batch([good[0], spoilt, good[2]], [0, 1, 2])
    assert loader.decode_fallbacks == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a second warning would raise here
        with pytest.raises(BadImageError):
            loader._decode_batch([spoilt], [1])
    assert loader.decode_fallbacks == 2
