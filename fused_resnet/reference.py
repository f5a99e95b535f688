"""The executable spec: every fused_resnet op in plain PyTorch.

Every backend (C++ CPU, CUDA, Triton) must match these functions; tests compare against
them, usually on float64 copies of the inputs. They are also the ``torch`` backend, so they
are differentiable by ordinary autograd and work on any device and dtype PyTorch supports.

Conventions (the op contract, see ``csrc/ops.cpp`` and DESIGN.md):

* Activations are 4-D with logical shape ``(N, C, H, W)``; results are returned
  channels_last (NHWC in memory).
* Per-channel vectors (``scale``, ``shift``, ``in_scale``, ...) are 1-D in the
  *accumulation dtype*: float64 for float64 activations, float32 otherwise. The
  elementwise math runs in that dtype and the result is rounded once to the activation dtype.
* ``stats`` is a ``(2, K)`` tensor in the accumulation dtype: row 0 the per-channel mean of
  ``z``, row 1 its ``M2`` (sum of squared deviations from the mean) over
  ``count = N * P * Q`` values. Mean/M2 rather than sum/sum-of-squares keeps the variance
  accurate when ``|mean| >> std``; partial results merge with Chan's formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "acc_dtype",
    "conv_bn_act",
    "conv_stats",
    "bn_finalize",
    "bn_update_running_stats",
    "bn_add_act",
    "bn_add_act_backward",
    "stats_backward",
    "fold_bn",
]

_CL = torch.channels_last


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a call whose activations have ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bc(v: Tensor) -> Tensor:
    """(K,) -> (1, K, 1, 1) for broadcasting over (N, K, H, W)."""
    return v.view(1, -1, 1, 1)


def _act(t: Tensor, relu: bool) -> Tensor:
    return torch.relu(t) if relu else t


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None = None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
    relu: bool = True,
) -> Tensor:
    """``y = relu?(conv(x, weight) * scale + shift + residual?)``.

    x: (N, C, H, W); weight: (K, C/groups, R, S), same dtype as x; scale, shift: (K,) in the
    accumulation dtype; residual: (N, K, P, Q) like the output. Returns (N, K, P, Q) in x's
    dtype, channels_last. The convolution is computed in x's dtype; the epilogue in the
    accumulation dtype.
    """
    acc = acc_dtype(x.dtype)
    c = F.conv2d(x, weight, None, tuple(stride), tuple(padding), tuple(dilation), groups)
    y = c.to(acc) * _bc(scale) + _bc(shift)
    if residual is not None:
        y = y + residual.to(acc)
    return _act(y, relu).to(x.dtype).contiguous(memory_format=_CL)


def conv_bn_act_residual_(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
    relu: bool = True,
) -> None:
    """:func:`conv_bn_act` with ``residual`` written in place with the result:
    ``residual[:] = relu?(conv(x, weight) * scale + shift + residual)``. Returns None."""
    residual.copy_(conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu))


def conv_stats(
    x: Tensor,
    weight: Tensor,
    in_scale: Tensor | None = None,
    in_shift: Tensor | None = None,
    in_relu: bool = False,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """``z = conv(relu?(x * in_scale + in_shift), weight)`` and per-channel stats of ``z``.

    The prologue (``in_scale``/``in_shift``/``in_relu``, each optional; a missing scale is 1, a
    missing shift 0) is applied to x before padding, so a padded pixel is 0 after the transform.
    The transformed input is rounded to x's dtype before the convolution, as a fused kernel
    feeds it to the tensor cores. Returns ``z`` (N, K, P, Q) in x's dtype, channels_last, and
    ``stats`` (2, K) = (mean, M2) of ``z`` (as rounded to x's dtype) in the accumulation dtype.
    """
    acc = acc_dtype(x.dtype)
    xin = x
    if in_scale is not None or in_shift is not None or in_relu:
        t = x.to(acc)
        if in_scale is not None:
            t = t * _bc(in_scale)
        if in_shift is not None:
            t = t + _bc(in_shift)
        xin = _act(t, in_relu).to(x.dtype)
    z = F.conv2d(xin, weight, None, tuple(stride), tuple(padding), tuple(dilation), groups)
    z = z.contiguous(memory_format=_CL)
    za = z.to(acc)
    mean = za.mean(dim=(0, 2, 3))
    m2 = ((za - _bc(mean)) ** 2).sum(dim=(0, 2, 3))
    return z, torch.stack([mean, m2])


def bn_finalize(
    stats: Tensor,
    count: int,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm folded into a per-channel affine map.

    ``var = M2 / count`` (biased, as BatchNorm normalizes), ``invstd = 1 / sqrt(var + eps)``,
    ``scale = gamma * invstd``, ``shift = beta - mean * scale``; a missing gamma is 1, a missing
    beta 0. Returns ``(scale, shift, save_mean, save_invstd)``, each (K,) in stats' dtype.
    """
    mean, m2 = stats[0], stats[1]
    invstd = torch.rsqrt(m2 / count + eps)
    scale = invstd if gamma is None else gamma * invstd
    shift = -mean * scale if beta is None else beta - mean * scale
    # Fresh tensors, as the kernels return: no output aliases stats or another output.
    scale = invstd.clone() if gamma is None else scale
    return scale, shift, mean.clone(), invstd


def bn_update_running_stats(
    stats: Tensor,
    count: int,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None = None,
    momentum: float | None = 0.1,
) -> None:
    """In-place running-statistics update, exactly as ``nn.BatchNorm2d`` in training.

    ``num_batches_tracked`` (if given) is incremented first; ``momentum=None`` means the
    cumulative average ``1 / num_batches_tracked``. ``running_var`` gets the unbiased variance
    ``M2 / (count - 1)``.
    """
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / float(num_batches_tracked.item())
    else:
        factor = float(momentum)
    mean, m2 = stats[0], stats[1]
    unbiased = m2 / max(count - 1, 1)
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


def bn_add_act(
    z: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None = None,
    res_scale: Tensor | None = None,
    res_shift: Tensor | None = None,
    relu: bool = True,
) -> Tensor:
    """``y = relu?(z * scale + shift + (residual * res_scale + res_shift | residual))``.

    The residual's own BN (``res_scale``/``res_shift``, a projection shortcut's "dual BN") is
    applied on the fly; either may be given alone. Returns z's shape and dtype, channels_last.
    """
    acc = acc_dtype(z.dtype)
    y = z.to(acc) * _bc(scale) + _bc(shift)
    if residual is not None:
        r = residual.to(acc)
        if res_scale is not None:
            r = r * _bc(res_scale)
        if res_shift is not None:
            r = r + _bc(res_shift)
        y = y + r
    return _act(y, relu).to(z.dtype).contiguous(memory_format=_CL)


def bn_add_act_backward(
    grad_out: Tensor,
    z: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None = None,
    res_scale: Tensor | None = None,
    res_shift: Tensor | None = None,
    relu: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`bn_add_act` (the pre-activation is recomputed, not stored).

    With ``g = grad_out * (pre_activation > 0)`` (or ``grad_out`` without ReLU), in the
    accumulation dtype: ``grad_z = g * scale``, ``grad_scale = sum(g * z)``,
    ``grad_shift = sum(g)``, ``grad_residual = g * res_scale`` (or ``g``),
    ``grad_res_scale = sum(g * residual)``; sums run over (N, H, W). ``grad_residual`` is
    empty (numel 0) without a residual and ``grad_res_scale`` without ``res_scale``; the
    gradient of ``res_shift`` is ``grad_shift``. Activation gradients come back in the
    activation dtype, channels_last; vectors in the accumulation dtype.
    """
    acc = acc_dtype(z.dtype)
    pre = z.to(acc) * _bc(scale) + _bc(shift)
    if residual is not None:
        r = residual.to(acc)
        if res_scale is not None:
            r = r * _bc(res_scale)
        if res_shift is not None:
            r = r + _bc(res_shift)
        pre = pre + r
    g = grad_out.to(acc)
    if relu:
        g = torch.where(pre > 0, g, torch.zeros((), dtype=acc, device=g.device))
    dims = (0, 2, 3)
    grad_z = (g * _bc(scale)).to(z.dtype).contiguous(memory_format=_CL)
    grad_scale = (g * z.to(acc)).sum(dims)
    grad_shift = g.sum(dims)
    empty_act = z.new_empty(0)
    empty_vec = scale.new_empty(0)
    if residual is None:
        return grad_z, grad_scale, grad_shift, empty_act, empty_vec
    gr = g * _bc(res_scale) if res_scale is not None else g
    grad_residual = gr.to(residual.dtype).contiguous(memory_format=_CL)
    grad_res_scale = (g * residual.to(acc)).sum(dims) if res_scale is not None else empty_vec
    return grad_z, grad_scale, grad_shift, grad_residual, grad_res_scale


def stats_backward(
    grad_z: Tensor, grad_stats: Tensor, z: Tensor, stats: Tensor, count: int
) -> Tensor:
    """Total gradient reaching ``z`` from both outputs of :func:`conv_stats`.

    ``mean = sum(z) / count`` and ``M2 = sum((z - mean)^2)``, so
    ``dL/dz = grad_z + grad_stats[0] / count + 2 * grad_stats[1] * (z - mean)``
    (the mean's own dependence on z cancels in M2's derivative). Returns z's dtype,
    channels_last.
    """
    acc = stats.dtype
    g = grad_z.to(acc) + _bc(grad_stats[0] / count) + 2 * _bc(grad_stats[1]) * (z.to(acc) - _bc(stats[0]))
    return g.to(z.dtype).contiguous(memory_format=_CL)


def fold_bn(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    conv_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm (after an optional conv bias) as ``(scale, shift)``.

    ``scale = weight / sqrt(running_var + eps)``,
    ``shift = bias - (running_mean - conv_bias) * scale``; missing weight is 1, bias 0.
    """
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = weight * scale
    mean = running_mean if conv_bias is None else running_mean - conv_bias
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift
