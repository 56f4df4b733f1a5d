"""The one device resolver of teskd_fast: the loaders' ``device=`` and the training command's ``--device``."""

import torch


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
