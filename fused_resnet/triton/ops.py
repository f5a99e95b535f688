"""The Triton kernels as PyTorch ops: ``torch.ops.fused_resnet_triton.*``.

Decision: the ops live in their own namespace, ``fused_resnet_triton``, because the
``fused_resnet::*`` names are already declared by ``_C`` (with CPU/CUDA kernels) and may not
exist at all when ``_C`` is not loaded; ``torch.library.triton_op`` has to own the op it defines.
Each op has the same name, argument names, argument order and meaning as its ``fused_resnet``
counterpart (``csrc/ops.cpp``); the schema is inferred from the type hints, so fixed-size
``int[2]`` arguments appear as ``int[]`` (the launchers read two values).

``triton_op`` + ``wrap_triton`` let ``torch.compile`` see through each op into its Triton
kernels (no graph break, no opaque custom op); no fake kernel is needed because the Python body
runs on fake tensors while tracing.

Autograd (``torch.library.register_autograd``): the same structure as :mod:`fused_resnet.ops`
(and its ``bn_finalize`` backward and context setup are reused from there), but every fused
step calls the Triton ops: convolution gradients through ``aten.convolution_backward``, the
ReLU-mask + BN backward through ``bn_add_act_backward`` (one pass), the prologue input and the
pre-activation convolution recomputed instead of stored. Double backward is not supported.

Autocast is not registered for these ops; the functional API casts nothing either (call them
with matching dtypes, as :mod:`fused_resnet.functional` validates).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.library import triton_op

from .. import ops as _cops
from . import bn as _bn
from . import conv as _conv

NS = "fused_resnet_triton"
_CL = torch.channels_last


def _t():
    return torch.ops.fused_resnet_triton


# ----------------------------------------------------------------------------- forward ops


@triton_op(f"{NS}::conv_bn_act", mutates_args=())
def conv_bn_act(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None,
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                relu: bool) -> Tensor:
    return _conv.launch_conv(x, weight, stride, padding, dilation, groups, scale=scale, shift=shift,
                             residual=residual, relu=relu)


@triton_op(f"{NS}::conv_stats", mutates_args=())
def conv_stats(x: Tensor, weight: Tensor, in_scale: Tensor | None, in_shift: Tensor | None, in_relu: bool,
               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
               groups: int) -> tuple[Tensor, Tensor]:
    return _conv.launch_conv(x, weight, stride, padding, dilation, groups, in_scale=in_scale, in_shift=in_shift,
                             in_relu=in_relu, stats=True)


@triton_op(f"{NS}::bn_finalize", mutates_args=())
def bn_finalize(stats: Tensor, count: int, gamma: Tensor | None, beta: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bn.bn_finalize(stats, count, gamma, beta, eps)


@triton_op(f"{NS}::bn_update_running_stats",
           mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_update_running_stats(stats: Tensor, count: int, running_mean: Tensor, running_var: Tensor,
                            num_batches_tracked: Tensor | None, momentum: float | None) -> None:
    _bn.bn_update_running_stats(stats, count, running_mean, running_var, num_batches_tracked, momentum)


@triton_op(f"{NS}::bn_add_act", mutates_args=())
def bn_add_act(z: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None, res_scale: Tensor | None,
               res_shift: Tensor | None, relu: bool) -> Tensor:
    return _bn.bn_add_act(z, scale, shift, residual, res_scale, res_shift, relu)


@triton_op(f"{NS}::bn_add_act_backward", mutates_args=())
def bn_add_act_backward(grad_out: Tensor, z: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None,
                        res_scale: Tensor | None, res_shift: Tensor | None,
                        relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _bn.bn_add_act_backward(grad_out, z, scale, shift, residual, res_scale, res_shift, relu)


@triton_op(f"{NS}::stats_backward", mutates_args=())
def stats_backward(grad_z: Tensor, grad_stats: Tensor, z: Tensor, stats: Tensor, count: int) -> Tensor:
    return _bn.stats_backward(grad_z, grad_stats, z, stats, count)


# ----------------------------------------------------------------------------- autograd


def _backward_conv_bn_act(ctx, grad):
    x, weight, scale, shift, residual = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    nx, nw, nscale, nshift, nres = ctx.needs_input_grad[:5]
    # The single-launch forward does not store the pre-activation conv output: recompute it.
    c = torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, False, [0, 0], groups)
    gc, gscale, gshift, gres, _ = _t().bn_add_act_backward(grad, c, scale, shift, residual, None, None, ctx.relu)
    gx, gw = _cops._conv_backward(gc, x, weight, stride, padding, dilation, groups, nx, nw)
    return (gx, gw, gscale if nscale else None, gshift if nshift else None,
            gres if (nres and residual is not None) else None, None, None, None, None, None)


def _backward_conv_stats(ctx, grad_z, grad_stats):
    x, weight, in_scale, in_shift, z, stats = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    nx, nw, nscale, nshift = ctx.needs_input_grad[:4]
    k = z.shape[1]
    count = z.numel() // k if k else 0
    if grad_z is None:
        grad_z = torch.zeros_like(z)
    if grad_stats is None:
        grad_stats = torch.zeros_like(stats)
    g = _t().stats_backward(grad_z, grad_stats, z, stats, count)
    if not ctx.has_prologue:
        gx, gw = _cops._conv_backward(g, x, weight, stride, padding, dilation, groups, nx, nw)
        return gx, gw, None, None, None, None, None, None, None
    c = x.shape[1]
    s = in_scale if in_scale is not None else torch.ones(c, dtype=torch.float32, device=x.device)
    b = in_shift if in_shift is not None else torch.zeros(c, dtype=torch.float32, device=x.device)
    # Recompute the transformed input instead of keeping it alive since the forward.
    xin = _t().bn_add_act(x, s, b, None, None, None, ctx.in_relu)
    need_xin = nx or nscale or nshift
    gxin, gw = _cops._conv_backward(g, xin, weight, stride, padding, dilation, groups, need_xin, nw)
    gx = gs = gb = None
    if need_xin:
        gx, gs, gb, _, _ = _t().bn_add_act_backward(gxin, x, s, b, None, None, None, ctx.in_relu)
    return (gx if nx else None, gw, gs if (nscale and in_scale is not None) else None,
            gb if (nshift and in_shift is not None) else None, None, None, None, None, None)


def _backward_bn_add_act(ctx, grad):
    z, scale, shift, residual, res_scale, res_shift = ctx.saved_tensors
    gz, gscale, gshift, gres, gres_scale = _t().bn_add_act_backward(
        grad, z, scale, shift, residual, res_scale, res_shift, ctx.relu)
    n = ctx.needs_input_grad
    return (gz if n[0] else None, gscale if n[1] else None, gshift if n[2] else None,
            gres if (n[3] and residual is not None) else None,
            gres_scale if (n[4] and res_scale is not None) else None,
            gshift if (n[5] and res_shift is not None) else None, None)


def _register_autograd():
    reg = torch.library.register_autograd
    reg(f"{NS}::conv_bn_act", _backward_conv_bn_act, setup_context=_cops._setup_conv_bn_act)
    reg(f"{NS}::conv_stats", _backward_conv_stats, setup_context=_cops._setup_conv_stats)
    reg(f"{NS}::bn_finalize", _cops._backward_bn_finalize, setup_context=_cops._setup_bn_finalize)
    reg(f"{NS}::bn_add_act", _backward_bn_add_act, setup_context=_cops._setup_bn_add_act)


_register_autograd()
