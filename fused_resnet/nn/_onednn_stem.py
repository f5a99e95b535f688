"""The ResNet stem (7x7/2 conv + folded BN + ReLU + 3x3/2 max-pool) in oneDNN's blocked layout, for
eval plans on the CPU (see :class:`fused_resnet.nn._fusion.EvalPlan`).

Why: the stem's convolution has 3 input channels. On an NHWC input oneDNN runs its generic
``brg_conv_fwd`` kernel, and the NCHW -> NHWC conversion of the input is a slow strided copy; from
the plain NCHW input to its 8-channel-blocked output layout oneDNN has a dedicated kernel
(``jit:avx2`` "first convolution"), and max-pooling in that layout reads the 4x larger conv output
once. Measured on the 2-core AVX2 CPU this project benchmarks on (batch 8, 224x224, float32,
1 thread, median of 21 interleaved repeats): conv_bn_act + max_pool2d 34.2 ms, this path 28.2 ms
(benchmarks/NOTES.md, fifth session).

How: the input (NCHW, as models receive it) goes to an oneDNN tensor as is; one
``torch.mkldnn_convolution`` with the BN-folded weight (pre-reordered once to oneDNN's layout,
rebuilt with the plan whenever a weight or BN tensor changes) and the BN shift as bias; max-pool in
the blocked layout; then ReLU, applied after the pool (max-pool and ReLU commute: ReLU is
monotonic, so max(relu(a), relu(b)) = relu(max(a, b)) exactly) in the same pass that writes the
channels_last result. The folded weight is ``weight * scale`` rounded once to float32, as the
C++ oneDNN path does; results match the ordinary path to float32 rounding (different summation
order), not bitwise.

Only float32 CPU tensors, ``groups=1``, an ``nn.MaxPool2d`` without indices or dilation, oneDNN
available and enabled (``torch.backends.mkldnn``), and ``FUSED_RESNET_CPU_ONEDNN`` not ``0`` (the
switch of the C++ oneDNN path, which turns this one off too).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

_CL = torch.channels_last


def unsupported_reason(x: Tensor, conv: nn.Conv2d, pool: nn.Module) -> str | None:
    """None when :class:`OneDNNStem` can run this stem on ``x``, else why not."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "float32 CPU tensors only"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "oneDNN is not available or disabled"
    if os.environ.get("FUSED_RESNET_CPU_ONEDNN", "").strip() == "0":
        return "FUSED_RESNET_CPU_ONEDNN=0"
    if type(pool) is not nn.MaxPool2d or pool.return_indices or _pair(pool.dilation) != (1, 1):
        return "the pool is not an nn.MaxPool2d without indices and dilation"
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or isinstance(conv.padding, str):
        return "grouped, dilated or string-padded stem convolution"
    return None


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def pool_args(pool: nn.MaxPool2d) -> tuple:
    """``(kernel_size, stride, padding, dilation, ceil_mode)`` of ``pool``, as pairs: the
    positional arguments of ``max_pool2d`` / ``aten.max_pool2d_with_indices``."""
    return (_pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding),
            _pair(pool.dilation), bool(pool.ceil_mode))


class OneDNNStem:
    """``relu(maxpool(conv(x) * scale + shift))`` -> channels_last, as described in the module
    docstring. Built from the conv, its folded ``scale``/``shift`` (float32, (K,)) and the pool."""

    __slots__ = ("weight", "bias", "conv_args", "pool_args")

    def __init__(self, conv: nn.Conv2d, scale: Tensor, shift: Tensor, pool: nn.MaxPool2d) -> None:
        with torch.no_grad():
            folded = (conv.weight.detach() * scale.view(-1, 1, 1, 1)).contiguous()
        padding, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
        self.weight = torch._C._nn.mkldnn_reorder_conv2d_weight(folded.to_mkldnn(), padding, stride, dilation, 1)
        self.bias = shift.detach().contiguous()
        self.conv_args = (padding, stride, dilation, 1)
        self.pool_args = pool_args(pool)  # dilation 1 (unsupported_reason)

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.mkldnn_convolution(x.contiguous().to_mkldnn(), self.weight, self.bias, *self.conv_args)
        y = torch.nn.functional.max_pool2d(y, *self.pool_args).to_dense()
        out = torch.empty(y.shape, dtype=y.dtype, memory_format=_CL)
        return torch.clamp_min(y, 0, out=out)
