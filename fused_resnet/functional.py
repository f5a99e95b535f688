"""Public functional API: the fused ops, with validation and backend choice.

Every function validates its arguments here (a ``ValueError``/``TypeError`` naming the argument
and what was expected), picks a backend (:mod:`fused_resnet.backends`) and calls one op:
``torch.ops.fused_resnet.*`` for the ``cpu``/``cuda`` backends, ``torch.ops.fused_resnet_triton.*``
(:mod:`fused_resnet.triton`, same arguments) for ``triton``, :mod:`fused_resnet.reference`
for ``torch``. All are differentiable.

Layout and dtypes (the op contract): activations are 4-D ``(N, C, H, W)`` tensors of float32,
float64, float16 or bfloat16; results come back channels_last (inputs in NCHW or any other
strides are accepted and read once into NHWC, so keep tensors channels_last to avoid that copy).
Per-channel vectors are 1-D float32 (float64 when the activations are float64). ``stats`` is a
``(2, K)`` tensor of per-channel (mean, M2). ``stride``/``padding``/``dilation`` take an int or
a pair of ints, as in :func:`torch.nn.functional.conv2d`; string padding is not supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ext, backends, reference
from . import ops as _ops

__all__ = [
    "conv_bn_act",
    "conv_stats",
    "bn_finalize",
    "bn_add_act",
    "fold_bn",
]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_REGISTERED = _ops.register()


# ----------------------------------------------------------------------------- validation


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, str):
        raise ValueError(f"{name}: string values ({value!r}) are not supported; pass an int or a pair of ints")
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in value
    ):
        pair = (value[0], value[1])
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if pair[0] < minimum or pair[1] < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return pair


def _check_activation(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor (N, C, H, W), got {t.dim()}-D with shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_like(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (same as {ref_name}), got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (same as {ref_name}), got {t.dtype}")


def _check_vector(v, name: str, k: int, like: Tensor, optional: bool = False) -> None:
    if v is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a tensor of shape ({k},), got None")
    if not isinstance(v, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
    acc = reference.acc_dtype(like.dtype)
    if v.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {v.device}")
    if v.dim() != 1 or v.shape[0] != k:
        raise ValueError(f"{name}: expected shape ({k},), got {tuple(v.shape)}")
    if v.dtype != acc:
        raise TypeError(
            f"{name}: expected dtype {acc} (per-channel vectors are float32, float64 for float64 "
            f"activations), got {v.dtype}"
        )


def _check_conv(x, weight, stride, padding, dilation, groups):
    _check_activation(x, "x")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-D tensor (K, C/groups, R, S), got shape {tuple(weight.shape)}")
    _check_like(weight, "weight", x, "x")
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)) or groups < 1:
        raise ValueError(f"groups: expected an int >= 1, got {groups!r}")
    c, k = x.shape[1], weight.shape[0]
    # Decision: a convolution over zero input channels (or a zero-sized kernel) is refused, not
    # computed: F.conv2d itself returns a wrongly shaped result for it, and no network has one.
    if c == 0:
        raise ValueError(f"x: expected at least one input channel (C >= 1), got shape {tuple(x.shape)}")
    if weight.shape[2] == 0 or weight.shape[3] == 0:
        raise ValueError(f"weight: expected a kernel of at least 1x1, got shape {tuple(weight.shape)}")
    if c % groups:
        raise ValueError(f"groups: x has {c} channels, not divisible by groups={groups}")
    if k % groups:
        raise ValueError(f"groups: weight has {k} output channels, not divisible by groups={groups}")
    if weight.shape[1] * groups != c:
        raise ValueError(
            f"weight: expected shape (K, {c // groups}, R, S) for x with {c} channels and "
            f"groups={groups}, got {tuple(weight.shape)}"
        )
    for i in range(2):
        eff = dilation[i] * (weight.shape[2 + i] - 1) + 1
        if x.shape[2 + i] + 2 * padding[i] < eff:
            raise ValueError(
                f"x: spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than the "
                f"dilated kernel ({eff})"
            )
    p, q = _ops.conv_out_hw(x.shape[2], x.shape[3], weight, stride, padding, dilation)
    return stride, padding, dilation, (x.shape[0], k, p, q)


def _check_residual(r, name: str, shape, ref: Tensor, ref_name: str) -> None:
    if r is None:
        return
    _check_activation(r, name)
    _check_like(r, name, ref, ref_name)
    if tuple(r.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(r.shape)}")


def _check_stats(stats, name: str = "stats") -> None:
    if not isinstance(stats, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(stats).__name__}")
    if stats.dim() != 2 or stats.shape[0] != 2:
        raise ValueError(f"{name}: expected shape (2, K) holding (mean, M2) rows, got {tuple(stats.shape)}")
    if stats.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: expected float32 or float64, got {stats.dtype}")


def _autocast(*tensors):
    """Autocast's cast of the activation arguments, applied before validation.

    Under ``torch.autocast`` the ops take ``x``/``weight``/``residual``/``z`` in the autocast
    dtype, as ``F.conv2d`` does (floating tensors other than float64; per-channel vectors stay
    float32). Casting here, not only in the ops' autocast kernels, lets a float32 weight meet a
    bfloat16 activation from the previous layer, and gives the ``torch`` backend the same rule.
    """
    out = []
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type):
            t = _ops.autocast_cast(t, t.device.type, torch.get_autocast_dtype(t.device.type))
        out.append(t)
    return out


def _decide(op: str, like: Tensor, backend: str | None) -> str:
    decision = backends.choose(op, like.device, like.dtype, backend)
    backends.record(decision)
    return decision.backend


def _impl(op: str, like: Tensor, backend: str | None):
    """The namespace whose ``op`` runs this call: :mod:`reference`, ``torch.ops.fused_resnet``
    (cpu/cuda) or ``torch.ops.fused_resnet_triton`` (triton, registered on first use)."""
    name = _decide(op, like, backend)
    if name == "torch":
        return reference
    if name == "triton":
        from .triton import load_ops

        return load_ops()
    return torch.ops.fused_resnet


# ----------------------------------------------------------------------------- API


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    relu: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Inference conv + folded BatchNorm (+ residual) (+ ReLU):
    ``y = relu?(conv2d(x, weight) * scale + shift + residual?)``.

    Args:
        x: (N, C, H, W) input.
        weight: (K, C/groups, R, S), same dtype and device as x.
        scale, shift: (K,) folded BatchNorm (see :func:`fold_bn`); a conv bias folds into shift.
        residual: optional (N, K, P, Q) shortcut added before the activation, same dtype as x.
        stride, padding, dilation, groups: as :func:`torch.nn.functional.conv2d`.
        relu: apply ReLU at the end.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"auto"`` (default: the
            ``FUSED_RESNET_BACKEND`` variable, else auto).

    Returns:
        (N, K, P, Q) tensor in x's dtype, channels_last.
    """
    x, weight, residual = _autocast(x, weight, residual)
    stride, padding, dilation, out_shape = _check_conv(x, weight, stride, padding, dilation, groups)
    k = weight.shape[0]
    _check_vector(scale, "scale", k, x)
    _check_vector(shift, "shift", k, x)
    _check_residual(residual, "residual", out_shape, x, "x")
    args = (x, weight, scale, shift, residual, stride, padding, dilation, groups, bool(relu))
    return _impl("conv_bn_act", x, backend).conv_bn_act(*args)


def conv_stats(
    x: Tensor,
    weight: Tensor,
    in_scale: Tensor | None = None,
    in_shift: Tensor | None = None,
    in_relu: bool = False,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Training-mode convolution with the previous BatchNorm applied as it loads, and batch
    statistics of its output.

    ``z = conv2d(relu?(x * in_scale + in_shift), weight)`` -- the prologue (each part optional)
    applies the *previous* layer's BN (+ ReLU) so that tensor never has to be materialised;
    zero padding applies to the transformed input.

    Args:
        x: (N, C, H, W); weight: (K, C/groups, R, S) like x.
        in_scale, in_shift: optional (C,) per-channel vectors of the prologue.
        in_relu: ReLU in the prologue.

    Returns:
        ``(z, stats)``: z (N, K, P, Q) in x's dtype, channels_last; stats (2, K) per-channel
        (mean, M2) of z over its ``count = N * P * Q`` values, float32 (float64 for float64 x).
    """
    x, weight = _autocast(x, weight)
    stride, padding, dilation, _ = _check_conv(x, weight, stride, padding, dilation, groups)
    c = x.shape[1]
    _check_vector(in_scale, "in_scale", c, x, optional=True)
    _check_vector(in_shift, "in_shift", c, x, optional=True)
    args = (x, weight, in_scale, in_shift, bool(in_relu), stride, padding, dilation, groups)
    return _impl("conv_stats", x, backend).conv_stats(*args)


def check_train_count(count) -> None:
    """``count`` (values per channel behind a batch's statistics) must be an int > 1, as
    ``nn.BatchNorm2d`` requires in training."""
    if isinstance(count, bool) or not isinstance(count, (int, torch.SymInt)):
        raise TypeError(f"count: expected an int, got {count!r}")
    if count <= 1:
        raise ValueError(
            f"count: expected more than 1 value per channel when training (as nn.BatchNorm2d), got {count}"
        )


def bn_finalize(
    stats: Tensor,
    count: int,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Turn batch statistics into the per-channel affine map of training-mode BatchNorm, and
    update the running statistics exactly as ``nn.BatchNorm2d`` does.

    Args:
        stats: (2, K) (mean, M2) from :func:`conv_stats`.
        count: number of values per channel behind ``stats`` (``N * P * Q``); must be > 1, as
            ``nn.BatchNorm2d`` requires more than one value per channel in training.
        gamma, beta: optional (K,) BN weight and bias (missing = 1 and 0), stats' dtype.
        running_mean, running_var: optional (K,) buffers, updated in place (both or neither).
        num_batches_tracked: optional int64 counter, incremented in place.
        momentum: as ``nn.BatchNorm2d``; ``None`` is the cumulative moving average (needs
            ``num_batches_tracked``).
        eps: added to the biased variance.

    Returns:
        ``(scale, shift, save_mean, save_invstd)``, each (K,) in stats' dtype, with
        ``scale = gamma * invstd`` and ``shift = beta - mean * scale``. Differentiable with
        respect to stats, gamma and beta.

    Two ops run: the pure ``bn_finalize`` (with autograd) and ``bn_update_running_stats``
    (in place, no autograd), because PyTorch registers autograd only for functional ops.
    """
    _check_stats(stats)
    k = stats.shape[1]
    check_train_count(count)
    if float(eps) < 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    for v, name in ((gamma, "gamma"), (beta, "beta")):
        if v is not None:
            _check_vector(v, name, k, stats)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both or neither")
    if running_mean is not None:
        for v, name in ((running_mean, "running_mean"), (running_var, "running_var")):
            if not isinstance(v, Tensor) or v.shape != (k,) or not v.is_floating_point():
                raise ValueError(f"{name}: expected a floating tensor of shape ({k},), got {v!r:.80}")
            if v.device != stats.device:
                raise ValueError(f"{name}: expected device {stats.device}, got {v.device}")
    if num_batches_tracked is not None and (
        not isinstance(num_batches_tracked, Tensor) or num_batches_tracked.numel() != 1
        or num_batches_tracked.dtype != torch.int64
    ):
        raise ValueError("num_batches_tracked: expected a one-element int64 tensor")
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError("momentum: None (cumulative average) needs num_batches_tracked")
    if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum: expected a float in [0, 1] or None, got {momentum}")

    impl = _impl("bn_finalize", stats, backend)
    out = impl.bn_finalize(stats, count, gamma, beta, float(eps))
    if running_mean is not None:
        with torch.no_grad():
            impl.bn_update_running_stats(
                stats.detach(), count, running_mean, running_var, num_batches_tracked,
                None if momentum is None else float(momentum),
            )
    return tuple(out)


def bn_add_act(
    z: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None = None,
    res_scale: Tensor | None = None,
    res_shift: Tensor | None = None,
    relu: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Block end in training: ``relu?(z * scale + shift + shortcut)`` where the shortcut is
    ``residual * res_scale + res_shift`` (a projection shortcut's own BN applied on the fly,
    "dual BN"; either part optional) or plain ``residual``.

    Args:
        z: (N, K, H, W) raw convolution output. scale, shift: (K,).
        residual: optional tensor of z's shape and dtype. res_scale, res_shift: optional (K,),
            only with a residual.

    Returns:
        Tensor of z's shape and dtype, channels_last.
    """
    z, residual = _autocast(z, residual)
    _check_activation(z, "z")
    k = z.shape[1]
    _check_vector(scale, "scale", k, z)
    _check_vector(shift, "shift", k, z)
    _check_residual(residual, "residual", z.shape, z, "z")
    if residual is None and (res_scale is not None or res_shift is not None):
        raise ValueError("res_scale, res_shift: given without a residual")
    _check_vector(res_scale, "res_scale", k, z, optional=True)
    _check_vector(res_shift, "res_shift", k, z, optional=True)
    args = (z, scale, shift, residual, res_scale, res_shift, bool(relu))
    return _impl("bn_add_act", z, backend).bn_add_act(*args)


def fold_bn(bn: torch.nn.Module, conv_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Eval-mode ``scale, shift`` of a BatchNorm2d / FrozenBatchNorm2d (float32 vectors).

    Uses the running statistics (the module's mode is not consulted). Differentiable with
    respect to the BN's weight and bias.
    """
    mean = bn.running_mean
    var = bn.running_var
    if mean is None or var is None:
        raise ValueError("bn: has no running statistics (track_running_stats=False); cannot fold")
    return reference.fold_bn(mean.float(), var.float(),
                             None if bn.weight is None else bn.weight.float(),
                             None if bn.bias is None else bn.bias.float(), bn.eps,
                             None if conv_bias is None else conv_bias.float())


def compiled_ops_available() -> bool:
    """Whether the compiled ops (``fused_resnet._C``) are loaded and registered."""
    return _REGISTERED and _ext.available()
