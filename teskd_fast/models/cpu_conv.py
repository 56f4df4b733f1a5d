"""A way around a oneDNN bug in the weight gradient of strided 1x1 convolutions with few input channels (CPU).

The bug: oneDNN's ``jit_1x1`` backward-weights kernel (PyTorch's CPU convolutions run on oneDNN) first copies a
strided input to unit stride into a workspace ("reduce to unit stride", rtus). With the input in channels-last
(nhwc) memory and fewer input channels than the kernel's channel block (8 with AVX2, 16 with AVX-512), that copy
writes past its workspace: the weight gradient is silently wrong, or the heap is corrupted (``double free or
corruption``, ``corrupted size vs. prev_size``, a segfault later in the backward), or the OpenMP team spins for
ever. Upstream: uxlfoundation/oneDNN issue 6035. Seen with torch 2.14.1 (and the oneDNN it bundles):

    import torch  # run with ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 machine, or as it is on an AVX2-only one
    x = torch.randn(6, 4, 32, 32).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(8, 4, 1, 1).to(memory_format=torch.channels_last).requires_grad_()
    torch.nn.functional.conv2d(x, w, stride=2).sum().backward()   # hangs (32x32), segfaults (56x56)

Measured here (a sweep over input channels 1-40, 8-112 px, strides 1-3, 1x1 to 4x4 kernels, both memory formats, one
and two threads): only 1x1 kernels with stride 2 and channels-last input fail; with AVX2 for 1-7 input channels
(wrong weight gradients at 8 and 32 px, hangs and crashes at 32 and 56 px); on the AVX-512 dispatch for 1-15 input
channels at 56 px and more (crashes). Stride 1, kernels larger than 1x1 and 16 or more input channels pass
everywhere. A ResNet's downsample shortcut is exactly such a convolution, and any width below 0.25 (0.125 with
the AVX2 dispatch) gives one; the fast formulation runs the network channels-last.

The way around: a 1x1 convolution with stride s and no padding reads only every s-th pixel, so it equals the same
convolution with stride 1 on ``x[..., ::s, ::s]``; the slice is what oneDNN's rtus would have copied, and the
unit-stride kernel has no such copy. Same weights, same products and sums: exact, and it costs nothing measurable
(it runs only for convolutions of fewer than 16 input channels). Remove this module when PyTorch ships a oneDNN
with the fix (the reproduction above then runs, with correct weight gradients, on every dispatch).
"""

import torch.nn as nn
import torch.nn.functional as F

# Below this many input channels per group a strided 1x1 conv goes round oneDNN's rtus (the kernel's channel
# block: 8 with AVX2, 16 with AVX-512).
SMALL_CHANNELS = 16


class UnitStridePointwiseConv2d(nn.Conv2d):
    """A strided 1x1 ``nn.Conv2d`` (no padding) computed on the CPU as a stride-1 conv of the subsampled input.

    The same module otherwise (parameters, state_dict names, hooks); on other devices the plain strided conv.
    """

    def _conv_forward(self, x, weight, bias):
        if x.device.type != "cpu":
            return super()._conv_forward(x, weight, bias)
        step_h, step_w = self.stride
        return F.conv2d(x[..., ::step_h, ::step_w], weight, bias, 1, 0, self.dilation, self.groups)


def is_affected(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution oneDNN's strided 1x1 backward-weights kernel could get wrong."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride != (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.in_channels // conv.groups < SMALL_CHANNELS
    )


def avoid_strided_pointwise_bug(model: nn.Module) -> nn.Module:
    """Make every affected ``nn.Conv2d`` of ``model`` a :class:`UnitStridePointwiseConv2d`, in place.

    The modules keep their identity, parameters and buffers (only their class changes), so optimizers, state_dicts
    and hooks are untouched. Returns ``model``.
    """
    for module in model.modules():
        if is_affected(module):
            module.__class__ = UnitStridePointwiseConv2d
    return model
