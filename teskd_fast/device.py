"""The one device resolver of teskd_fast (the loaders' ``device=``, the training command's ``--device``), and the
process-wide backend settings that training and the benchmarks share."""

import torch

# Float32 matmul precision on CUDA: TF32 tensor cores ("high"). Set through torch.set_float32_matmul_precision, the
# API whose state torch.get_float32_matmul_precision (which Inductor's autotuning reads) can report; setting only
# the per-backend torch.backends.*.fp32_precision leaves that getter raising about mixed legacy and new settings.
CUDA_MATMUL_PRECISION = "high"


def resolve_device(device=None, index=None):
    """A concrete ``torch.device`` for ``device``, with a clear error for a GPU this machine does not have.

    Args:
        device: ``None`` or ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:1"`` or a ``torch.device``.
        index: the CUDA device a bare ``"cuda"`` (or ``"auto"``) means; default: the current CUDA device.
            ``torchrun`` processes pass their ``LOCAL_RANK``.

    Returns:
        ``torch.device("cpu")`` or ``torch.device("cuda", i)`` (always with its index).
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was asked for but CUDA is not available on this machine; "
                           "use 'cpu'")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if index is None else int(index))
    if device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {str(device)!r} was asked for but only {torch.cuda.device_count()} CUDA "
                           "device(s) are visible")
    return device


def make_current(device):
    """Make a CUDA ``device`` with an index this process's current CUDA device; anything else is left alone.

    What works on "the current device" rather than on its tensors' device (the code ``torch.compile`` generates,
    cuDNN and cuBLAS handles, CUDA graphs, events and pinned buffers made without a device) then uses it.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def configure_backends(device):
    """The process-wide backend settings of ``teskd-train`` on ``device``; the benchmarks call it too.

    On CUDA: ``device`` (with its index) becomes the current CUDA device, ``torch.backends.cudnn.benchmark`` is
    turned on (cuDNN times its convolution algorithms once per input shape and keeps the fastest) and float32
    matmuls may use TF32 (``torch.set_float32_matmul_precision("high")``). cuDNN convolutions use TF32 by
    PyTorch's default, which is left as it is. On the CPU nothing is changed.

    Args:
        device: the ``torch.device`` the run trains on.

    Returns:
        the settings made, as a dict (empty on the CPU), for logs and benchmark records.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    make_current(device)
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision(CUDA_MATMUL_PRECISION)
    return {"cudnn_benchmark": True, "float32_matmul_precision": CUDA_MATMUL_PRECISION}
