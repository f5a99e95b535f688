"""Python-side registrations for the ops declared in ``csrc/ops.cpp``.

For every ``torch.ops.fused_resnet.*`` op this module registers:

* a fake (meta) kernel -- output shapes, dtypes and channels_last strides, so the ops trace
  under ``torch.compile`` and ``torch.export``;
* autograd (``torch.library.register_autograd``) for the forward ops ``conv_bn_act``,
  ``conv_stats``, ``bn_finalize`` and ``bn_add_act``. Convolution gradients use
  ``aten.convolution_backward`` (cuDNN on GPU); the ReLU-mask + BN backward runs as the fused
  ``bn_add_act_backward`` op; the prologue input ``relu(x * in_scale + in_shift)`` and, for
  ``conv_bn_act``, the pre-activation convolution are recomputed in backward instead of being
  stored (less activation memory, one extra pass / one extra convolution). Double backward is
  not supported;
* autocast: under ``torch.autocast`` the activation inputs (``x``, ``weight``, ``residual``,
  ``z``) are cast to the autocast dtype, like ``F.conv2d`` (floating tensors other than float64,
  as autocast does); per-channel vectors stay float32.

``bn_update_running_stats`` mutates its buffers and has no autograd (running statistics never
need gradients). ``conv_bn_act_residual_`` (``conv_bn_act`` written into its residual, for eval
plans) mutates its residual and has no autograd either: its kernels refuse a call that would need a
gradient, and it has no autocast rule (a cast residual would be a copy, and the write would be
lost). Nothing here runs when ``_C`` is not loaded: then the functional API uses the
reference implementation directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext

_NS = "fused_resnet"
_CL = torch.channels_last
_lib: torch.library.Library | None = None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_out_hw(h, w, weight, stride, padding, dilation):
    """Output (P, Q) of a convolution, as F.conv2d computes it."""
    r, s = weight.shape[2], weight.shape[3]
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def _empty_cl(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=_CL)


def _vec_ones(n: int, like: Tensor) -> Tensor:
    return torch.ones(n, dtype=_acc(like.dtype), device=like.device)


def _vec_zeros(n: int, like: Tensor) -> Tensor:
    return torch.zeros(n, dtype=_acc(like.dtype), device=like.device)


def _op(name: str):
    return getattr(torch.ops.fused_resnet, name).default


# ----------------------------------------------------------------------------- fake kernels


def _fake_conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    p, q = conv_out_hw(x.shape[2], x.shape[3], weight, stride, padding, dilation)
    return _empty_cl((x.shape[0], weight.shape[0], p, q), x)


def _fake_conv_bn_act_residual_(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    return None


def _fake_conv_stats(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups):
    p, q = conv_out_hw(x.shape[2], x.shape[3], weight, stride, padding, dilation)
    k = weight.shape[0]
    z = _empty_cl((x.shape[0], k, p, q), x)
    return z, torch.empty((2, k), dtype=_acc(x.dtype), device=x.device)


def _fake_bn_finalize(stats, count, gamma, beta, eps):
    k = stats.shape[1]
    return tuple(torch.empty(k, dtype=stats.dtype, device=stats.device) for _ in range(4))


def _fake_bn_update_running_stats(stats, count, running_mean, running_var, num_batches_tracked, momentum):
    return None


def _fake_bn_add_act(z, scale, shift, residual, res_scale, res_shift, relu):
    return _empty_cl(z.shape, z)


def _fake_bn_add_act_backward(grad_out, z, scale, shift, residual, res_scale, res_shift, relu):
    k = z.shape[1]
    vec = lambda n: torch.empty(n, dtype=scale.dtype, device=scale.device)  # noqa: E731
    grad_residual = _empty_cl(residual.shape, residual) if residual is not None else z.new_empty(0)
    grad_res_scale = vec(k) if (residual is not None and res_scale is not None) else vec(0)
    return _empty_cl(z.shape, z), vec(k), vec(k), grad_residual, grad_res_scale


def _fake_bn_finalize_backward(grad_scale, grad_shift, grad_mean, grad_invstd, gamma, scale, mean, invstd, count):
    k = scale.shape[0]
    return scale.new_empty((2, k)), scale.new_empty((k,))


def _fake_stats_backward(grad_z, grad_stats, z, stats, count):
    return _empty_cl(z.shape, z)


# ----------------------------------------------------------------------------- autograd


def _conv_backward(grad, x, weight, stride, padding, dilation, groups, need_x, need_w):
    if not (need_x or need_w):
        return None, None
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad.contiguous(memory_format=_CL) if grad.dim() == 4 else grad,
        x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [need_x, need_w, False],
    )
    return gx, gw


def _setup_conv_bn_act(ctx, inputs, output):
    x, weight, scale, shift, residual, stride, padding, dilation, groups, relu = inputs
    ctx.save_for_backward(x, weight, scale, shift, residual)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.relu = relu


def _setup_conv_stats(ctx, inputs, output):
    x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups = inputs
    z, stats = output
    ctx.save_for_backward(x, weight, in_scale, in_shift, z, stats)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.in_relu = in_relu
    ctx.has_prologue = in_scale is not None or in_shift is not None or in_relu


def _setup_bn_finalize(ctx, inputs, output):
    stats, count, gamma, beta, eps = inputs
    scale, shift, mean, invstd = output
    ctx.save_for_backward(gamma, scale, mean, invstd)
    ctx.count = count


def _finalize_backward_kernel(t: Tensor) -> bool:
    """Whether the compiled ``bn_finalize_backward`` runs tensors like ``t`` (CPU or CUDA)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(t.device.type)
    return key is not None and _ext.has_kernel("bn_finalize_backward", key)


def _backward_bn_finalize(ctx, g_scale, g_shift, g_mean, g_invstd):
    # scale = gamma * invstd, shift = beta - mean * scale, invstd = (M2 / count + eps)^-1/2.
    # Tiny (K,) vectors: one bn_finalize_backward launch where it is compiled, else ~12 plain
    # torch ops (the same formula).
    gamma, scale, mean, invstd = ctx.saved_tensors
    if _finalize_backward_kernel(scale):
        grad_stats, grad_gamma = _op("bn_finalize_backward")(g_scale, g_shift, g_mean, g_invstd, gamma, scale,
                                                             mean, invstd, ctx.count)
        n = ctx.needs_input_grad
        grad_beta = (torch.zeros_like(mean) if g_shift is None else g_shift) if n[3] else None
        return (grad_stats if n[0] else None, None, grad_gamma if (n[2] and gamma is not None) else None,
                grad_beta, None)
    zeros = torch.zeros_like(mean)
    g_scale = zeros if g_scale is None else g_scale
    g_shift = zeros if g_shift is None else g_shift
    g_scale_total = g_scale - g_shift * mean
    grad_gamma = g_scale_total * invstd if gamma is not None else None
    grad_beta = g_shift if ctx.needs_input_grad[3] else None
    d_invstd = g_scale_total * (gamma if gamma is not None else 1.0)
    if g_invstd is not None:
        d_invstd = d_invstd + g_invstd
    d_mean = -g_shift * scale
    if g_mean is not None:
        d_mean = d_mean + g_mean
    d_m2 = d_invstd * (-0.5 * invstd.pow(3) / ctx.count)
    grad_stats = torch.stack([d_mean, d_m2]) if ctx.needs_input_grad[0] else None
    return grad_stats, None, grad_gamma if ctx.needs_input_grad[2] else None, grad_beta, None


def _setup_bn_add_act(ctx, inputs, output):
    z, scale, shift, residual, res_scale, res_shift, relu = inputs
    ctx.save_for_backward(z, scale, shift, residual, res_scale, res_shift)
    ctx.relu = relu


def make_backwards(ops):
    """The backward formulas of ``conv_bn_act``, ``conv_stats`` and ``bn_add_act``.

    ``ops()`` returns the op namespace whose fused ``bn_add_act``, ``bn_add_act_backward`` and
    ``stats_backward`` they call (looked up at backward time, so the namespace may be registered
    later): ``torch.ops.fused_resnet`` for the compiled kernels, ``torch.ops.fused_resnet_triton``
    for the Triton backend -- one set of formulas for every backend. Returns
    ``(backward_conv_bn_act, backward_conv_stats, backward_bn_add_act)`` for
    ``torch.library.register_autograd``, paired with the ``_setup_*`` context functions here.
    """

    def backward_conv_bn_act(ctx, grad):
        x, weight, scale, shift, residual = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        nx, nw, nscale, nshift, nres = ctx.needs_input_grad[:5]
        # The pre-activation conv output is not stored by the single-launch forward: recompute it.
        c = torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, False, [0, 0], groups)
        gc, gscale, gshift, gres, _ = ops().bn_add_act_backward(
            grad, c, scale, shift, residual, None, None, ctx.relu
        )
        gx, gw = _conv_backward(gc, x, weight, stride, padding, dilation, groups, nx, nw)
        return (gx, gw, gscale if nscale else None, gshift if nshift else None,
                gres if (nres and residual is not None) else None, None, None, None, None, None)

    def backward_conv_stats(ctx, grad_z, grad_stats):
        x, weight, in_scale, in_shift, z, stats = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        nx, nw, nscale, nshift = ctx.needs_input_grad[:4]
        k = z.shape[1]
        count = z.numel() // k if k else 0
        if grad_z is None:
            grad_z = torch.zeros_like(z)
        if grad_stats is None:
            grad_stats = torch.zeros_like(stats)
        g = ops().stats_backward(grad_z, grad_stats, z, stats, count)
        if not ctx.has_prologue:
            gx, gw = _conv_backward(g, x, weight, stride, padding, dilation, groups, nx, nw)
            return gx, gw, None, None, None, None, None, None, None
        c = x.shape[1]
        s = in_scale if in_scale is not None else _vec_ones(c, x)
        b = in_shift if in_shift is not None else _vec_zeros(c, x)
        # Recompute the transformed input instead of having kept it alive since the forward.
        xin = ops().bn_add_act(x, s, b, None, None, None, ctx.in_relu)
        need_xin = nx or nscale or nshift
        gxin, gw = _conv_backward(g, xin, weight, stride, padding, dilation, groups, need_xin, nw)
        gx = gs = gb = None
        if need_xin:
            gx, gs, gb, _, _ = ops().bn_add_act_backward(gxin, x, s, b, None, None, None, ctx.in_relu)
        return (gx if nx else None, gw, gs if (nscale and in_scale is not None) else None,
                gb if (nshift and in_shift is not None) else None, None, None, None, None, None)

    def backward_bn_add_act(ctx, grad):
        z, scale, shift, residual, res_scale, res_shift = ctx.saved_tensors
        gz, gscale, gshift, gres, gres_scale = ops().bn_add_act_backward(
            grad, z, scale, shift, residual, res_scale, res_shift, ctx.relu
        )
        n = ctx.needs_input_grad
        return (
            gz if n[0] else None,
            gscale if n[1] else None,
            gshift if n[2] else None,
            gres if (n[3] and residual is not None) else None,
            gres_scale if (n[4] and res_scale is not None) else None,
            gshift if (n[5] and res_shift is not None) else None,
            None,
        )

    return backward_conv_bn_act, backward_conv_stats, backward_bn_add_act


_backward_conv_bn_act, _backward_conv_stats, _backward_bn_add_act = make_backwards(lambda: torch.ops.fused_resnet)


# ----------------------------------------------------------------------------- autocast

# Positions of the activation arguments that autocast casts, per op.
_AUTOCAST_ARGS = {"conv_bn_act": (0, 1, 4), "conv_stats": (0, 1), "bn_add_act": (0, 3)}


def autocast_cast(t, device_type: str, dtype: torch.dtype):
    """Autocast's rule for one activation argument: a floating tensor on ``device_type`` other
    than float64 goes to ``dtype``; anything else (None, float64, another device) is returned as is."""
    if (isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype)
            and t.device.type == device_type):
        return t.to(dtype)
    return t


def _register_autocast(lib: torch.library.Library, name: str, positions: tuple[int, ...]) -> None:
    op = _op(name)
    for device_type, key_name in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        key = getattr(torch._C.DispatchKey, key_name)

        def impl(*args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            args = list(args)
            for i in positions:
                args[i] = autocast_cast(args[i], _device_type, dtype)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args)

        # py_impl makes tracing (torch.compile / export) see the same rule as eager.
        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(impl)
        lib.impl(name, lambda _keyset, *args, _impl=impl: _impl(*args), key_name, with_keyset=True)


# ----------------------------------------------------------------------------- registration


def register() -> bool:
    """Register fake kernels, autograd and autocast for the compiled ops (idempotent)."""
    global _lib
    if _lib is not None:
        return True
    if not _ext.available():
        return False
    fakes = {
        "conv_bn_act": _fake_conv_bn_act,
        "conv_bn_act_residual_": _fake_conv_bn_act_residual_,
        "conv_stats": _fake_conv_stats,
        "bn_finalize": _fake_bn_finalize,
        "bn_update_running_stats": _fake_bn_update_running_stats,
        "bn_add_act": _fake_bn_add_act,
        "bn_add_act_backward": _fake_bn_add_act_backward,
        "stats_backward": _fake_stats_backward,
        "bn_finalize_backward": _fake_bn_finalize_backward,
    }
    for name, fn in fakes.items():
        torch.library.register_fake(f"{_NS}::{name}", fn)
    autograd = {
        "conv_bn_act": (_backward_conv_bn_act, _setup_conv_bn_act),
        "conv_stats": (_backward_conv_stats, _setup_conv_stats),
        "bn_finalize": (_backward_bn_finalize, _setup_bn_finalize),
        "bn_add_act": (_backward_bn_add_act, _setup_bn_add_act),
    }
    for name, (bwd, setup) in autograd.items():
        torch.library.register_autograd(f"{_NS}::{name}", bwd, setup_context=setup)
    _lib = torch.library.Library(_NS, "IMPL")
    for name, positions in _AUTOCAST_ARGS.items():
        _register_autocast(_lib, name, positions)
    return True
