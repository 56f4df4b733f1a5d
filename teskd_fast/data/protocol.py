"""What a loader must offer to train under :class:`teskd_fast.train.trainer.Trainer`: the :class:`Loader` protocol.

Every built-in loader follows it (the digits, CIFAR and the three ImageFolder backends; checked in
``tests/test_data_protocol.py``), and so may one of another library with a thin adapter: the trainer asks for
nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Loader(Protocol):
    """A resumable, seeded loader of ``(images, labels)`` batches on the training device.

    Shapes:
        iteration yields ``images [B, C, H, W]`` (normalised, on the device) and ``labels [B]`` int64.
    """

    #: The class names, in label order (their number sizes the network's classifier).
    classes: Sequence[str] | None

    def __len__(self) -> int:
        """Batches per pass for this process."""
        ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass: the batches of the selected epoch, from its start batch on."""
        ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch of the next pass (its order and augmentation, from ``(seed, epoch)``) and make that
        pass start at batch ``start_batch`` with exactly the batches an uninterrupted pass gives there."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands (epoch, position, what a saved state must agree on)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next pass yields the batches the saved loader had not handed out."""
        ...


@runtime_checkable
class ResizableLoader(Loader, Protocol):
    """A :class:`Loader` whose training resolution can change between passes (progressive resizing)."""

    def set_image_size(self, image_size: int) -> None:
        """Training resolution of the next passes; evaluation keeps its crop."""
        ...
