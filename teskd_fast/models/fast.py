"""The ``fast`` formulation: the same parameters and the same function as the faithful network, computed cheaper.

Equivalences used (all exact in real arithmetic; the tests compare both formulations in float64):

- Up block: ``conv1x1(upsample(t)) == upsample(conv1x1(t))``. Both are linear; the 1x1 conv mixes channels at each
  pixel, the bilinear resize mixes pixels within each channel, so they commute. The conv then runs at the coarse
  level's resolution: 4x fewer multiply-accumulates (6.36 G -> 5.55 G per 224x224 image for ResNet-18).
- Fuse block: ``W @ concat(u + l, u) == (W_a + W_b) @ u + W_a @ l`` with ``W = [W_a | W_b]`` split along its input
  channels: no concat and no ``u + l`` tensor is materialised.
- Student heads: a k x k conv with stride k sees disjoint patches, so it is one matmul of the patches
  (``"b c (h i) (w j) -> b h w (i j c)"``) with the flattened weight; on the CPU this beats the
  strided convolution by a wide margin (bench/bench_models.py).
- Up block BatchNorm (train mode) from the coarse map: the upsampled map's per-channel mean is a weighted sum of
  the coarse map (weights: the column sums of the interpolation matrices A_h, A_w), and its sum of squares is
  ``sum(Y * (G_h Y G_w))`` with ``G = A^T A`` (h x h and w x w), so batch statistics need no full-resolution pass.
  BatchNorm is then a per-channel affine map, which commutes with the bilinear resize (its weights sum to 1):
  ``relu(bn(resize(y))) == relu(resize(a * y + b))``. Running statistics are updated as ``nn.BatchNorm2d`` does
  (unbiased variance, momentum or cumulative average, ``num_batches_tracked``).
- The K student linears are one batched matmul, giving student logits and features as stacked
  ``[K, B, C]`` / ``[K, B, W]`` tensors.
- Channels-last memory format throughout (``create_model`` converts the network; :meth:`forward` the input): 1x1
  convs become plain GEMMs, and BatchNorm, ReLU and the bilinear resize run their vectorised channels-last kernels.

BatchNorm layers are called as the faithful network calls them, so batch statistics, running statistics and
``num_batches_tracked`` evolve identically in train mode.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

from .teskd import TESKDNet, fit

# einops keeps a cache of backends by tensor type, and torch.compile guards on its size: a type first seen after
# a compilation (a Parameter, after plain tensors) would recompile every graph. Fill it now, for both types.
for _t in (torch.empty(0), torch.nn.Parameter(torch.empty(0))):
    rearrange(_t, "n -> n")
del _t


def interpolation_matrix(n_in, n_out, dtype, device) -> torch.Tensor:
    """``[n_out, n_in]`` weights of 1-D linear interpolation with align_corners=True (rows sum to 1)."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = torch.arange(n_out, dtype=torch.float64, device=device) * scale
    low = src.floor().clamp(max=n_in - 1)
    frac = src - low
    low = low.long()
    high = (low + 1).clamp(max=n_in - 1)
    a = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    a.scatter_add_(1, low[:, None], (1 - frac)[:, None])
    a.scatter_add_(1, high[:, None], frac[:, None])
    return a.to(dtype)


# (n_in, n_out, dtype, device) -> the column sums and Gram matrix of the interpolation matrix, built once.
_RESIZE_STATS = {}


def resize_statistics(n_in, n_out, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A.sum(0), A.T @ A)`` of :func:`interpolation_matrix` ``A`` (``[n_in]``, ``[n_in, n_in]``).

    Cached per (sizes, dtype, device) in eager mode: a dozen tiny launches per up block and step otherwise. Under
    ``torch.compile`` they are traced (constants the compiler folds)."""
    key = (n_in, n_out, dtype, device)
    stats = None if torch.compiler.is_compiling() else _RESIZE_STATS.get(key)
    if stats is None:
        a = interpolation_matrix(n_in, n_out, dtype, device)
        stats = (a.sum(0), a.t() @ a)
        if not torch.compiler.is_compiling():
            _RESIZE_STATS[key] = stats
    return stats


def resize_bn_relu(y, bn, size) -> torch.Tensor:
    """``relu(bn(interpolate(y, size, bilinear, align_corners=True)))`` with the BatchNorm computed on ``y``.

    Args:
        y: ``[B, C, h, w]`` (the up block's 1x1 conv output at the coarse resolution).
        bn: the up block's ``nn.BatchNorm2d`` (its running statistics are updated in train mode), or its
            ``nn.SyncBatchNorm`` (after ``convert_sync_batchnorm``): in a process group of several processes the
            statistics are then the global batch's, as SyncBatchNorm's own.
        size: the target ``(H, W)``.

    Returns:
        ``[B, C, H, W]``, equal to the faithful up block's output.
    """
    if bn.training:
        # Statistics in float32 at least (y is bf16/fp16 under autocast), with autocast off: it would run the
        # matmuls below in half precision, and the running statistics would drift from the faithful network's.
        with torch.autocast(y.device.type, enabled=False):
            mean, var, n = _upsampled_statistics(y.float() if y.dtype in (torch.float16, torch.bfloat16) else y, size)
            group = _sync_group(bn)
            if group is not None:
                mean, var, n = _global_statistics(mean, var, n, group)
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            # momentum None: cumulative average, as nn.BatchNorm2d (a tensor here: no host sync under compile).
            momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.to(mean.dtype)
            bn.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
            unbiased = n / max(n - 1, 1) if isinstance(n, int) else n / (n - 1).clamp(min=1)
            bn.running_var.mul_(1 - momentum).add_(var.detach() * (momentum * unbiased))
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = bn.weight * torch.rsqrt(var + bn.eps)
    shift = bn.bias - mean * scale
    z = (y * scale[:, None, None] + shift[:, None, None]).to(y.dtype)
    return F.relu(F.interpolate(z, size=size, mode="bilinear", align_corners=True))


def _sync_group(bn):
    """The process group whose global batch ``bn`` normalises over, or None (its own batch).

    As ``nn.SyncBatchNorm`` decides: a SyncBatchNorm in train mode, with an initialised process group of more than
    one process (``convert_sync_batchnorm`` turns the up blocks' BatchNorm into one under ``--sync-bn``)."""
    if not isinstance(bn, torch.nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of ``group``; the gradient is summed too (every rank's loss depends on every rank's
    input through the global statistics, as in ``nn.SyncBatchNorm``'s backward)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def _global_statistics(mean, var, n, group):
    """Per-channel mean and biased variance of the union of every process's batch, from each one's own.

    Combined as parallel variances are (no sum-of-squares cancellation): the global mean first, then
    ``sum_r n_r (var_r + (mean_r - mean)^2) / N``. Two small all-reduces; the batches may differ in size."""
    counts_and_sums = _AllReduceSum.apply(torch.cat([mean.new_full((1,), n), mean * n]), group)
    total = counts_and_sums[0]
    global_mean = counts_and_sums[1:] / total
    spread = _AllReduceSum.apply(n * (var + (mean - global_mean) ** 2), group)
    # N stays a tensor (the running variance's N / (N - 1) is computed on the device: no host synchronisation).
    return global_mean, spread / total, total.detach()


def _upsampled_statistics(y, size, stencil=None):
    """Per-channel mean and (biased) variance of ``interpolate(y, size)`` (bilinear, align_corners) from ``y``.

    ``stencil`` (default: on CUDA) applies the Gram matrices as the tridiagonal matrices they are (three products
    per element, :func:`_tridiagonal_apply`) instead of as matmuls: on CUDA a float32 matmul runs in TF32 under
    ``torch.set_float32_matmul_precision("high")`` (teskd-train's setting), which rounds its inputs to 10 mantissa
    bits; the stencil is plain float32 arithmetic, which Inductor fuses into the reduction. On the CPU, where
    float32 matmuls are exact, the matmuls are the faster eager path."""
    batch, _, h, w = y.shape
    col_h, gram_h = resize_statistics(h, size[0], y.dtype, y.device)
    col_w, gram_w = resize_statistics(w, size[1], y.dtype, y.device)
    n = batch * size[0] * size[1]
    mean = (y * torch.outer(col_h, col_w)).sum((0, 2, 3)) / n  # [C]
    centred = y - mean[:, None, None]
    # sum over the upsampled map of (A_h Y A_w^T)^2 = sum(Y * (A_h^T A_h) Y (A_w^T A_w)).
    # Contracted in [B, h, w, C] order: a plain view of channels-last memory, so each product is one GEMM.
    c_nhwc = centred.permute(0, 2, 3, 1)
    if y.is_cuda if stencil is None else stencil:
        mixed = _tridiagonal_apply(_tridiagonal_apply(c_nhwc, gram_h, 1), gram_w, 2)
    else:
        mixed = torch.matmul(gram_w, torch.matmul(gram_h, c_nhwc.flatten(2)).unflatten(2, (w, -1)))
    var = (c_nhwc * mixed).sum((0, 1, 2)) / n  # [C]
    return mean, var, n


def _tridiagonal_apply(x, gram, dim):
    """``gram @ x`` along ``dim`` for a symmetric tridiagonal ``gram`` ([n, n]): elementwise, no matmul.

    The Gram matrix ``A^T A`` of linear interpolation is tridiagonal: each row of ``A`` weighs two neighbouring
    inputs, so ``(A^T A)[i, j]`` is zero unless ``|i - j| <= 1``."""
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    out = x * gram.diagonal().view(shape)
    if n == 1:
        return out
    shape[dim] = n - 1
    off = gram.diagonal(1).view(shape)  # gram[i, i + 1] == gram[i + 1, i]
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    above = torch.cat([x.narrow(dim, 1, n - 1) * off, zero], dim)  # gram[i, i + 1] x[i + 1]
    below = torch.cat([zero, x.narrow(dim, 0, n - 1) * off], dim)  # gram[i, i - 1] x[i - 1]
    return out + above + below


def patch_conv(x, weight, bias) -> torch.Tensor:
    """A k x k convolution with stride k (disjoint patches) as one matmul.

    Args:
        x: ``[B, C, k*H, k*W]`` (any memory format).
        weight: ``[O, C, k, k]``.
        bias: ``[O]`` or None.

    Returns:
        ``[B, O, H, W]`` in channels-last memory format; equals ``F.conv2d(x, weight, bias, stride=k)``.
    """
    k = weight.shape[-1]
    # The patch under each output pixel, flattened in (row, column, channel) order: a plain view of channels-last
    # memory up to the final copy; the weight flattened in the same order.
    patches = rearrange(x, "b c (h i) (w j) -> b h w (i j c)", i=k, j=k)
    y = F.linear(patches, rearrange(weight, "o c i j -> o (i j c)"), bias)
    return rearrange(y, "b h w o -> b o h w")


class FastTESKDNet(TESKDNet):
    """The TESKD network of :class:`TESKDNet` (same modules, same state_dict), computed the cheap way.

    See the module docstring for the equivalences. Student logits and features come out stacked, deepest first:
    ``[K, B, C]`` and ``[K, B, W]`` (K = ``len(student_levels)``).
    """

    formulation = "fast"

    input_format = torch.channels_last

    def students(self, stages, levels=None) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.student_levels if levels is None else levels
        width = self.student_width
        size4 = stages[3].shape[-2:]
        t = self.laterals[3](stages[3])
        path = {}
        for level in range(3, min(levels) - 1, -1):
            lateral = self.laterals[level - 1](stages[level - 1])
            up = self.upsample[level - 1]
            # 1x1 conv at the coarse resolution, then BatchNorm as an affine map, then the resize, then ReLU.
            u = resize_bn_relu(F.conv2d(t, up[1].weight), up[2], lateral.shape[-2:])
            fuse = getattr(self, f"fuse_{level}")
            w_a, w_b = fuse[0].weight.split(width, dim=1)
            # fuse(concat(u + l, u)) without the concat: (W_a + W_b) u + W_a l.
            t = fuse[2](fuse[1](F.conv2d(u, w_a + w_b) + F.conv2d(lateral, w_a)))
            path[level] = t
        features = []
        for level in levels:
            head = getattr(self, f"downsample{level}")
            k = head[0].kernel_size
            h = patch_conv(fit(path[level], (k[0] * size4[0], k[1] * size4[1])), head[0].weight, head[0].bias)
            h = head[5](head[4](head[3](head[2](head[1](h)))))
            features.append(h.mean(dim=(2, 3)))
        features = rearrange(features, "k b w -> k b w")  # the heads stacked, deepest first
        fcs = [getattr(self, f"fc_b{level}") for level in levels]
        weight = rearrange([fc.weight for fc in fcs], "k c w -> k w c")
        bias = rearrange([fc.bias for fc in fcs], "k c -> k 1 c")
        logits = torch.baddbmm(bias, features, weight)  # [K, B, C]
        return logits, features
