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

Autocast (CPU and CUDA): under ``torch.autocast`` the activation arguments -- ``x``, ``weight``,
``residual`` of ``conv_bn_act``; ``x``, ``weight`` of ``conv_stats``; ``z``, ``residual`` of
``bn_add_act`` (the positions of ``fused_resnet.ops._AUTOCAST_ARGS``) -- are cast to the autocast
dtype by the same rule as the compiled ops (:func:`fused_resnet.ops.autocast_cast`: floating,
not float64, on the autocast device), and the op then runs with autocast off; per-channel
vectors stay float32 and the other ops cast nothing, exactly as for ``fused_resnet::*``.
Decision: a hand-written kernel per op rather than ``CustomOpDef.register_autocast``, which
casts *every* floating input (it would turn the float32 scale/shift into float16). The same
function is also registered with ``py_impl`` so ``torch.compile`` tracing sees the same rule.
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


# ----------------------------------------------------------------------------- argument checks
# The functional API validates before it calls these ops; direct ``torch.ops`` callers get the
# same kind of message (naming the argument and what was expected) instead of a bad launch.

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_act(t, name, like=None, like_name=""):
    if not isinstance(t, Tensor) or t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor (N, C, H, W), got {getattr(t, 'shape', t)}")
    if t.dtype not in _ACT_DTYPES:
        raise TypeError(f"{name}: the Triton backend expects float32, float16 or bfloat16, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name}: expected device {like.device} (same as {like_name}), got {t.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name}: expected dtype {like.dtype} (same as {like_name}), got {t.dtype}")


def _check_same_shape(t, name, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_vec(v, name, k, like, optional=True):
    if v is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a tensor of shape ({k},), got None")
    if v.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {v.device}")
    if v.dtype != torch.float32:
        raise TypeError(f"{name}: expected float32 (per-channel vectors), got {v.dtype}")
    if v.dim() != 1 or v.shape[0] != k:
        raise ValueError(f"{name}: expected shape ({k},), got {tuple(v.shape)}")


def _check_stats(t, name, k=None, like=None):
    if t.dim() != 2 or t.shape[0] != 2 or (k is not None and t.shape[1] != k):
        want = f"(2, {k})" if k is not None else "(2, K)"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: expected float32, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")


def _check_conv(x, weight, stride, padding, dilation, groups):
    _check_act(x, "x")
    _check_act(weight, "weight", x, "x")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or min(v) < lo:
            raise ValueError(f"{name}: expected two ints >= {lo}, got {list(v)}")
    c, k = x.shape[1], weight.shape[0]
    if c == 0 or weight.shape[2] == 0 or weight.shape[3] == 0:
        raise ValueError(f"x/weight: expected C >= 1 and a kernel of at least 1x1, got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if groups < 1 or c % groups or k % groups or weight.shape[1] * groups != c:
        raise ValueError(f"weight/groups: expected weight (K, C/groups, R, S) with C={c}, K divisible by "
                         f"groups={groups}, got {tuple(weight.shape)}")
    p, q = _conv.out_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    if p < 1 or q < 1:
        raise ValueError(f"x: spatial size {tuple(x.shape[2:])} with padding {list(padding)} is smaller than "
                         f"the dilated kernel")
    return (x.shape[0], k, p, q)


# ----------------------------------------------------------------------------- forward ops


@triton_op(f"{NS}::conv_bn_act", mutates_args=())
def conv_bn_act(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None,
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                relu: bool) -> Tensor:
    out_shape = _check_conv(x, weight, stride, padding, dilation, groups)
    _check_vec(scale, "scale", weight.shape[0], x, optional=False)
    _check_vec(shift, "shift", weight.shape[0], x, optional=False)
    if residual is not None:
        _check_act(residual, "residual", x, "x")
        _check_same_shape(residual, "residual", out_shape)
    return _conv.launch_conv(x, weight, stride, padding, dilation, groups, scale=scale, shift=shift,
                             residual=residual, relu=relu)


@triton_op(f"{NS}::conv_stats", mutates_args=())
def conv_stats(x: Tensor, weight: Tensor, in_scale: Tensor | None, in_shift: Tensor | None, in_relu: bool,
               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
               groups: int) -> tuple[Tensor, Tensor]:
    _check_conv(x, weight, stride, padding, dilation, groups)
    _check_vec(in_scale, "in_scale", x.shape[1], x)
    _check_vec(in_shift, "in_shift", x.shape[1], x)
    return _conv.launch_conv(x, weight, stride, padding, dilation, groups, in_scale=in_scale, in_shift=in_shift,
                             in_relu=in_relu, stats=True)


@triton_op(f"{NS}::bn_finalize", mutates_args=())
def bn_finalize(stats: Tensor, count: int, gamma: Tensor | None, beta: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_stats(stats, "stats")
    _check_vec(gamma, "gamma", stats.shape[1], stats)
    _check_vec(beta, "beta", stats.shape[1], stats)
    return _bn.bn_finalize(stats, count, gamma, beta, eps)


@triton_op(f"{NS}::bn_update_running_stats",
           mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_update_running_stats(stats: Tensor, count: int, running_mean: Tensor, running_var: Tensor,
                            num_batches_tracked: Tensor | None, momentum: float | None) -> None:
    _check_stats(stats, "stats")
    k = stats.shape[1]
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if v.dim() != 1 or v.shape[0] != k or not v.is_floating_point() or v.device != stats.device:
            raise ValueError(f"{name}: expected a floating ({k},) tensor on {stats.device}, got "
                             f"{v.dtype} {tuple(v.shape)} on {v.device}")
    if num_batches_tracked is not None and (num_batches_tracked.numel() != 1 or num_batches_tracked.dtype != torch.int64
                                            or num_batches_tracked.device != stats.device):
        raise ValueError(f"num_batches_tracked: expected a one-element int64 tensor on {stats.device}")
    _bn.bn_update_running_stats(stats, count, running_mean, running_var, num_batches_tracked, momentum)


def _check_bn_args(z, scale, shift, residual, res_scale, res_shift):
    _check_act(z, "z")
    k = z.shape[1]
    _check_vec(scale, "scale", k, z, optional=False)
    _check_vec(shift, "shift", k, z, optional=False)
    if residual is not None:
        _check_act(residual, "residual", z, "z")
        _check_same_shape(residual, "residual", z.shape)
    elif res_scale is not None or res_shift is not None:
        raise ValueError("res_scale, res_shift: given without a residual")
    _check_vec(res_scale, "res_scale", k, z)
    _check_vec(res_shift, "res_shift", k, z)


@triton_op(f"{NS}::bn_add_act", mutates_args=())
def bn_add_act(z: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None, res_scale: Tensor | None,
               res_shift: Tensor | None, relu: bool) -> Tensor:
    _check_bn_args(z, scale, shift, residual, res_scale, res_shift)
    return _bn.bn_add_act(z, scale, shift, residual, res_scale, res_shift, relu)


@triton_op(f"{NS}::bn_add_act_backward", mutates_args=())
def bn_add_act_backward(grad_out: Tensor, z: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None,
                        res_scale: Tensor | None, res_shift: Tensor | None,
                        relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_act(grad_out, "grad_out", z, "z")
    _check_same_shape(grad_out, "grad_out", z.shape)
    _check_bn_args(z, scale, shift, residual, res_scale, res_shift)
    return _bn.bn_add_act_backward(grad_out, z, scale, shift, residual, res_scale, res_shift, relu)


@triton_op(f"{NS}::stats_backward", mutates_args=())
def stats_backward(grad_z: Tensor, grad_stats: Tensor, z: Tensor, stats: Tensor, count: int) -> Tensor:
    _check_act(z, "z")
    _check_act(grad_z, "grad_z", z, "z")
    _check_same_shape(grad_z, "grad_z", z.shape)
    _check_stats(stats, "stats", z.shape[1], z)
    _check_stats(grad_stats, "grad_stats", z.shape[1], z)
    return _bn.stats_backward(grad_z, grad_stats, z, stats, count)


# ----------------------------------------------------------------------------- autograd


# The formulas are fused_resnet.ops' own, calling this namespace's fused backward ops.
_backward_conv_bn_act, _backward_conv_stats, _backward_bn_add_act = _cops.make_backwards(_t)


def _register_autograd():
    reg = torch.library.register_autograd
    reg(f"{NS}::conv_bn_act", _backward_conv_bn_act, setup_context=_cops._setup_conv_bn_act)
    reg(f"{NS}::conv_stats", _backward_conv_stats, setup_context=_cops._setup_conv_stats)
    reg(f"{NS}::bn_finalize", _cops._backward_bn_finalize, setup_context=_cops._setup_bn_finalize)
    reg(f"{NS}::bn_add_act", _backward_bn_add_act, setup_context=_cops._setup_bn_add_act)


_register_autograd()


# ----------------------------------------------------------------------------- autocast

_autocast_lib: torch.library.Library | None = None


def _register_autocast() -> None:
    """Autocast kernels for the AutocastCPU and AutocastCUDA keys (see the module docstring)."""
    global _autocast_lib
    if _autocast_lib is not None:
        return
    _autocast_lib = torch.library.Library(NS, "IMPL")
    for name, positions in _cops._AUTOCAST_ARGS.items():
        op = getattr(_t(), name).default
        for device_type, key_name in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
            key = getattr(torch._C.DispatchKey, key_name)

            def impl(*args, _op=op, _positions=positions, _device_type=device_type, _key=key):
                dtype = torch.get_autocast_dtype(_device_type)
                args = list(args)
                for i in _positions:
                    args[i] = _cops.autocast_cast(args[i], _device_type, dtype)
                with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                    return _op(*args)

            if op.has_kernel_for_dispatch_key(key):
                op.py_kernels.pop(key, None)
            op.py_impl(key)(impl)
            _autocast_lib.impl(name, lambda _keyset, *args, _impl=impl: _impl(*args), key_name, with_keyset=True)


_register_autocast()
