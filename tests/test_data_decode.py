"""ImageNet decode paths: JPEG header routing (CMYK to the CPU), nvjpeg stream ordering, DALI's reused pipeline."""

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_imagenet import make_image_folder, needs_dali, write_jpegs

from teskd_fast.data.common import epoch_order
from teskd_fast.data.folder import index_image_folder
from teskd_fast.data.jpeg import jpeg_frame
from teskd_fast.data.nvjpeg import NvjpegImageLoader, _collate, needs_cpu_decode

pytestmark = pytest.mark.timeout(300)
# Mean absolute difference (levels of 255) allowed between nvJPEG and libjpeg-turbo decodes of one file: they
# differ by a few levels (IDCT, plain against "fancy" chroma upsampling, ~2 on these noisy test photos); an
# overwritten or unwritten image differs by tens.
NVJPEG_VS_CPU = 8
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg decodes on the GPU: needs a CUDA device")


def _pil_rgb(path):
    """The torchvision backend's decode of a file: Pillow, convert("RGB"), as a uint8 [3, H, W] tensor."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as img:
        return pil_to_tensor(img.convert("RGB"))


def _jpeg_bytes(mode, size=(37, 53), **save):
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """One class of RGB, greyscale and CMYK JPEGs (in turn), of odd sizes."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(5)
    write_jpegs(root / "train" / "c0", rng, [(41 + 7 * i, 67 - 5 * i) for i in range(6)])
    return root


def test_jpeg_header_gives_size_components_and_the_route():
    cases = {
        "RGB": (3, False), "L": (1, False), "CMYK": (4, True),
    }
    for mode, (components, cpu) in cases.items():
        data = _jpeg_bytes(mode)
        frame = jpeg_frame(data)
        assert (frame.height, frame.width, frame.components, frame.precision) == (37, 53, components, 8), mode
        assert frame.marker == 0xC0 and needs_cpu_decode(data) is cpu, mode
    # Progressive JPEGs and a large EXIF segment before the frame: still read from the header, still on the GPU.
    progressive = _jpeg_bytes("RGB", progressive=True)
    assert jpeg_frame(progressive).marker == 0xC2 and not needs_cpu_decode(progressive)
    exif = _jpeg_bytes("RGB", exif=b"Exif\x00\x00" + bytes(30000))
    assert jpeg_frame(exif)[2:] == (37, 53, 3) and not needs_cpu_decode(exif)
    # Not a JPEG, or cut inside the header: no frame, and no CPU route (the batch decode names the file).
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (5, 5)).save(png, format="PNG")
    data = _jpeg_bytes("RGB")
    for bad in (png.getvalue(), b"", data[:20], bytes(range(256)) * 4):
        assert jpeg_frame(bad) is None and not needs_cpu_decode(bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_nvjpeg_worker_decodes_cmyk_as_the_torchvision_loader(mixed_folder):
    """CMYK files come out of the worker already decoded, equal to the torchvision backend's image of them."""
    from torchvision.io import ImageReadMode, decode_jpeg

    index = index_image_folder(mixed_folder / "train")
    loader = NvjpegImageLoader(index, decode_device="cpu", train=False, batch_size=6, image_size=32, val_resize=32,
                               device="cpu", workers=0)
    items = [loader._loader.dataset[i] for i in range(len(index.samples))]
    paths = [index.path(i) for i in range(len(index.samples))]
    modes = [("RGB", "L", "CMYK")[int(Path(p).stem.split("_")[1]) % 3] for p in paths]
    assert [d.dim() for d, _, _ in items] == [3 if m == "CMYK" else 1 for m in modes]
    data, labels, idx = _collate(items)
    images = loader._decode(data, idx)
    for img, path, mode, d in zip(images, paths, modes, data, strict=True):
        ref = _pil_rgb(path)
        assert img.shape == ref.shape and img.dtype == torch.uint8
        if mode == "CMYK":
            assert torch.equal(img, ref), "CMYK must be converted as the torchvision backend converts it"
        else:
            assert torch.equal(img, decode_jpeg(d, mode=ImageReadMode.RGB))
            assert (img.float() - ref.float()).abs().mean() < 2, "libjpeg-turbo through torchvision vs Pillow"
    # The whole loader over the mixed folder: every image, in the epoch's order.
    assert [int(v) for _, y in loader for v in y] == [0] * len(paths)


def _corrupted_rounds(decode, data, idx, ref, rounds):
    """Rounds in which a decode, run while the GPU is busy, disturbed the stream's queued work or its own output.

    Each round fills buffers of the decoded images' sizes, queues a long matmul chain, then reductions of those
    buffers and a fill of them (still queued when they are freed), and decodes: the freed blocks are what the
    caching allocator would hand the decoder. A correct decode leaves the sums right and equals ``ref``.
    """
    a = torch.randn(4096, 4096, device="cuda") / 64
    bad = 0
    for _ in range(rounds):
        victims = [torch.full(r.shape, 7, dtype=torch.uint8, device="cuda") for r in ref]
        torch.cuda.synchronize()
        stall = a
        for _ in range(16):
            stall = stall @ a
        sums = torch.stack([v.sum(dtype=torch.int64) for v in victims])
        for v in victims:
            v.fill_(165)
        del victims, v
        out = decode(data, idx)
        torch.cuda.synchronize()
        expected = torch.tensor([7 * r.numel() for r in ref])
        ok = torch.equal(sums.cpu(), expected) and all(torch.equal(o.cpu(), r) for o, r in zip(out, ref, strict=True))
        bad += not ok
        del out, stall, sums
    return bad


def _race_setup(folder):
    index = index_image_folder(folder / "train")
    loader = NvjpegImageLoader(index, train=False, batch_size=8, image_size=32, val_resize=32, device="cuda",
                               workers=0)
    items = [loader._loader.dataset[i] for i in range(len(index.samples))]
    items = [it for it in items if it[0].dim() == 1][:8]
    data, _, idx = _collate(items)
    return loader, data, idx


def nvjpeg_race(folder, rounds=20):
    """(corrupted rounds of the loader's decode, of torchvision's decode_jpeg called bare), on ``folder``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    loader, data, idx = _race_setup(folder)
    ref = [img.cpu() for img in loader._decode(data, idx)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cpu = [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]
        for r, c in zip(ref, cpu, strict=True):
            assert r.shape == c.shape and (r.float() - c.float()).abs().mean() < NVJPEG_VS_CPU
        ordered = _corrupted_rounds(loader._decode, data, idx, ref, rounds)
        bare = _corrupted_rounds(lambda d, _: decode_jpeg(d, mode=ImageReadMode.RGB, device="cuda"), data, idx, ref,
                                 rounds)
    return ordered, bare


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_decode_is_ordered_against_the_current_stream(tmp_path):
    root = make_image_folder(tmp_path, np.random.default_rng(9), per_class=4, splits=("train",))
    ordered, bare = nvjpeg_race(root)
    # What the harness sees without the ordering (torchvision's call alone): reported, not asserted, since a
    # torchvision that orders its decoder stream itself makes it 0.
    warnings.warn(f"nvjpeg race harness: the bare decode_jpeg was disturbed in {bare}/20 rounds", stacklevel=1)
    assert ordered == 0, f"the loader's decode disturbed the current stream's work in {ordered}/20 rounds"


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_decode_is_ordered_under_cuda_malloc_async(tmp_path):
    root = make_image_folder(tmp_path, np.random.default_rng(9), per_class=4, splits=("train",))
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch; "
              "from test_data_decode import nvjpeg_race; "
              "assert torch.cuda.get_allocator_backend() == 'cudaMallocAsync'; "
              f"print('RESULT', *nvjpeg_race(__import__('pathlib').Path({str(root)!r}), rounds=10))")
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ordered, bare = (int(v) for v in done.stdout.split("RESULT")[1].split())
    warnings.warn(f"nvjpeg race harness (cudaMallocAsync): the bare decode_jpeg was disturbed in {bare}/10 rounds",
                  stacklevel=1)
    assert ordered == 0, f"the loader's decode disturbed the current stream's work in {ordered}/10 rounds"


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_mixed_batch_on_cuda_matches_the_cpu_loader(mixed_folder):
    """RGB, greyscale and CMYK in one batch: nvJPEG for the first two, the worker's Pillow decode for CMYK."""
    index = index_image_folder(mixed_folder / "train")
    loader = NvjpegImageLoader(index, train=False, batch_size=6, image_size=32, val_resize=32, device="cuda",
                               workers=0)
    data, _, idx = _collate([loader._loader.dataset[i] for i in range(len(index.samples))])
    images = loader._decode(data, idx)
    torch.cuda.synchronize()
    for n, img in enumerate(images):
        path = index.path(n)
        ref = _pil_rgb(path)
        assert img.is_cuda and img.shape == ref.shape, path
        if n % 3 == 2:
            assert torch.equal(img.cpu(), ref), f"{path}: CMYK must match the torchvision backend exactly"
        else:
            err = (img.cpu().float() - ref.float()).abs().mean()
            assert err < NVJPEG_VS_CPU, f"{path}: nvJPEG differs from the CPU loader by {err:.2f} levels on average"
    # Through the loader: the batch has every image, the CMYK ones included, as normalised crops.
    x, y = next(iter(loader))
    assert x.is_cuda and x.shape == (6, 3, 32, 32) and torch.isfinite(x).all()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """9 classes of one image each: a label names its image, so an order can be compared with the documented one."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(4)
    for c in range(9):
        write_jpegs(root / "train" / f"class_{c}", rng, [(40 + 5 * c, 70 - 3 * c)])
    return root


@needs_dali
def test_dali_reuses_its_pipeline_with_the_documented_order(labelled):
    from teskd_fast.data.dali import DaliImageLoader

    index = index_image_folder(labelled / "train")
    loader = DaliImageLoader(index, train=True, batch_size=2, image_size=40, val_resize=48, device="cpu",
                             workers=2, seed=13)
    for epoch in (0, 1):
        # The order every backend documents: the permutation of (seed, epoch), this rank's contiguous shard.
        order, positions = epoch_order(9, shuffle=True, seed=13, epoch=epoch, equal_shards=True)
        batches = list(loader)
        assert [int(v) for _, y in batches for v in y] == order[positions].tolist(), f"epoch {epoch}"
        assert all(x.shape[1:] == (3, 40, 40) for x, _ in batches)
    assert loader.epoch == 2 and loader.pipelines_built == 1
    # Progressive resizing: a new size builds a pipeline once, then that one is reused.
    loader.set_image_size(24)
    assert all(x.shape[1:] == (3, 24, 24) for x, _ in loader)
    assert all(x.shape[1:] == (3, 24, 24) for x, _ in loader)
    assert loader.pipelines_built == 2
    # Mid-epoch resume on the reused pipeline: the same remaining batches, crops included.
    loader.set_epoch(4)
    full = list(loader)
    loader.set_epoch(4, start_batch=2)
    rest = list(loader)
    assert len(rest) == len(full) - 2 == 3
    assert all(torch.equal(x, xr) and torch.equal(y, yr) for (x, y), (xr, yr) in zip(full[2:], rest, strict=True))
    # A pass left after one batch, then a full one: the full epoch again, on the same pipeline.
    loader.set_epoch(4)
    next(iter(loader))
    loader.set_epoch(4)
    again = list(loader)
    assert all(torch.equal(x, xa) and torch.equal(y, ya) for (x, y), (xa, ya) in zip(full, again, strict=True))
    assert len(again) == len(full) and loader.pipelines_built == 2


@needs_dali
def test_dali_crops_follow_seed_epoch_rank_batch(tmp_path):
    """DALI draws the nvjpeg backend's crops and flips: the same training batches up to resampling."""
    from teskd_fast.data.dali import DaliImageLoader

    root = make_image_folder(tmp_path, np.random.default_rng(0), per_class=3, splits=("train",))
    index = index_image_folder(root / "train")
    kwargs = dict(train=True, batch_size=6, image_size=48, device="cpu", workers=2, seed=3)
    dali = [x for x, _ in DaliImageLoader(index, **kwargs)]
    nvjpeg = NvjpegImageLoader(index, decode_device="cpu", **kwargs)
    same = [x for x, _ in nvjpeg]
    nvjpeg.set_epoch(1)
    other = [x for x, _ in nvjpeg]
    for a, b, c in zip(dali, same, other, strict=True):
        # Normalised units (std ~ 1): resampling differs by ~0.005 on average, another crop by ~0.5.
        assert (a - b).abs().mean() < 0.05 < 0.2 < (a - c).abs().mean()


@needs_dali
def test_dali_decoder_arguments_and_threads(monkeypatch):
    from nvidia.dali import backend

    from teskd_fast.data.dali import HW_PREALLOCATE_SIDE, LARGE_IMAGE_SIDE, dali_threads, decoder_arguments

    gpu, cpu = decoder_arguments(mixed=True), decoder_arguments(mixed=False)
    nvjpeg_keys = {"device_memory_padding", "host_memory_padding", "hw_decoder_load", "preallocate_width_hint",
                   "preallocate_height_hint"}
    assert nvjpeg_keys <= gpu.keys() and not nvjpeg_keys & cpu.keys()
    assert gpu["adjust_orientation"] is False and cpu["adjust_orientation"] is False
    # Every argument is one of the two decoders' (DALI's operator schemas), so a pipeline built with them runs.
    for op in ("decoders__ImageSlice", "decoders__Image"):
        schema = backend.GetSchema(op)
        assert all(schema.HasArgument(k) for k in gpu), op
    # ImageNet-sized buffers: one decoded RGB image of LARGE_IMAGE_SIDE a side, far below DALI's example's 211 MB
    # and 141 MB per thread; the hardware decoder's hint covers the usual 500 x 375 ImageNet photo.
    assert gpu["device_memory_padding"] == gpu["host_memory_padding"] == 3 * LARGE_IMAGE_SIDE**2 < 16 * 2**20
    assert gpu["preallocate_width_hint"] == gpu["preallocate_height_hint"] == HW_PREALLOCATE_SIDE >= 500
    assert 0.5 <= gpu["hw_decoder_load"] <= 1
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert dali_threads(8) == max(1, cores // 4) and dali_threads(1) == cores
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert dali_threads(2) == max(1, cores // 2)
