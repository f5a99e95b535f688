"""The engine under the fused modules: one conv + norm "unit" at a time, through the fused ops.

Nothing here is a module. :mod:`fused_resnet.nn.modules` and :mod:`fused_resnet.models` call
these helpers with their ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` submodules.

Vocabulary:

* A *unit* is a ``Conv2d`` followed by a norm layer, optionally ReLU, optionally a shortcut
  added before the ReLU.
* Each unit runs in one of two *modes*, decided per call from the norm layer alone (so a block in
  ``train()`` whose BNs were put in ``eval()`` to freeze them folds, exactly as PyTorch would
  compute it):

  - ``"fold"``: the norm uses running statistics (``BatchNorm2d`` in eval with running stats,
    ``FrozenBatchNorm2d`` always): ``scale``/``shift`` are folded and the whole unit is ONE
    :func:`~fused_resnet.functional.conv_bn_act` call.
  - ``"batch"``: the norm uses batch statistics (``BatchNorm2d`` in training, or with
    ``track_running_stats=False``): :func:`~fused_resnet.functional.conv_stats` then
    :func:`~fused_resnet.functional.bn_finalize`; the BN (+ ReLU) is *not* applied yet but
    carried as a pending transform (:class:`Act`) that the next conv applies as it loads its input
    (the prologue) or the block's :func:`~fused_resnet.functional.bn_add_act` applies at the end.
* ``nn.SyncBatchNorm`` is fused like ``BatchNorm2d``; in batch mode while training, its batch
  statistics are merged across its process group (:func:`fused_resnet.distributed.sync_stats`)
  between ``conv_stats`` and ``bn_finalize``, as ``nn.SyncBatchNorm`` does.
* Any other norm layer (GroupNorm, LayerNorm, Identity, ...) cannot be fused;
  :func:`norm_reason` returns the reason and the caller runs its modules unfused.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import backends, reference
from .. import functional as F
from ..distributed import sync_stats

try:  # torchvision is a dependency, but keep the engine importable without it
    from torchvision.ops import FrozenBatchNorm2d as _FrozenBN
except Exception:  # pragma: no cover - torchvision missing or broken
    _FrozenBN = None

_CL = torch.channels_last

FOLD = "fold"
BATCH = "batch"


def check_backend(backend) -> str | None:
    """Validate a module's ``backend`` attribute: None (auto) or one of :data:`backends.BACKENDS`/``auto``."""
    if backend is None:
        return None
    if not isinstance(backend, str) or backend.lower() not in backends.BACKENDS + ("auto",):
        raise ValueError(f"backend: expected None or one of {', '.join(backends.BACKENDS)}, 'auto'; got {backend!r}")
    return backend.lower()


def is_frozen_bn(m: nn.Module) -> bool:
    return _FrozenBN is not None and isinstance(m, _FrozenBN)


def is_fusable_norm(m: nn.Module) -> bool:
    """``nn.BatchNorm2d`` (and subclasses), ``nn.SyncBatchNorm`` or ``torchvision.ops.FrozenBatchNorm2d``."""
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) or is_frozen_bn(m)


def norm_reason(m) -> str | None:
    """None if ``m`` is a norm layer the fused ops can run, else why not (one line)."""
    if is_fusable_norm(m):
        return None
    return f"{type(m).__name__} is not a BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d; only those are fused"


def norm_mode(m: nn.Module) -> str:
    """``"fold"`` or ``"batch"`` for a fusable norm layer (see the module docstring).

    ``BatchNorm2d`` uses batch statistics when ``training`` or when it has no running statistics
    -- the same rule as ``nn.BatchNorm2d.forward``.
    """
    if is_frozen_bn(m):
        return FOLD
    if m.training or m.running_mean is None or m.running_var is None:
        return BATCH
    return FOLD


def conv_reason(conv) -> str | None:
    """None if ``conv`` is an ``nn.Conv2d`` the fused ops can run, else why not."""
    if not isinstance(conv, nn.Conv2d):
        return f"expected an nn.Conv2d, got {type(conv).__name__}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}; only 'zeros' is fused"
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return None
        if any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)):
            return "padding='same' with an even effective kernel pads asymmetrically; not fused"
    return None


def conv_args(conv: nn.Conv2d) -> dict:
    """stride/padding/dilation/groups of ``conv`` for the functional ops (string padding resolved)."""
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # 'same' with an odd effective kernel (conv_reason refused the rest)
            padding = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
    return dict(stride=tuple(conv.stride), padding=tuple(padding), dilation=tuple(conv.dilation),
                groups=conv.groups)


def _key(t: Tensor | None):
    if t is None:
        return None
    return (id(t), t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape))


def _fold(bn: nn.Module, conv_bias: Tensor | None, acc: torch.dtype):
    """(scale, shift, invstd, mean_eff) in ``acc``, where ``mean_eff = running_mean - conv_bias``."""

    def cast(t):
        return None if t is None else t.detach().to(acc)

    mean, var = cast(bn.running_mean), cast(bn.running_var)
    scale, shift = reference.fold_bn(mean, var, cast(bn.weight), cast(bn.bias), float(bn.eps), cast(conv_bias))
    invstd = torch.rsqrt(var + float(bn.eps))
    mean_eff = mean if conv_bias is None else mean - cast(conv_bias)
    return scale, shift, invstd, mean_eff


def _fold_graph(bn: nn.Module, conv_bias: Tensor | None, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(scale, shift) computed with autograd (no cache): the torch.compile path."""

    def cast(t):
        return None if t is None else t.to(acc)

    return reference.fold_bn(cast(bn.running_mean), cast(bn.running_var), cast(bn.weight), cast(bn.bias),
                             float(bn.eps), cast(conv_bias))


class _CachedFold(torch.autograd.Function):
    """Hands out a cache's (scale, shift) with a gradient path to BN weight/bias and conv bias.

    ``scale = weight * invstd`` and ``shift = bias - mean_eff * scale`` with ``invstd``/``mean_eff``
    from the (gradient-free) running statistics, so ``d/d weight = (g_scale - g_shift * mean_eff) *
    invstd``, ``d/d bias = g_shift``, ``d/d conv_bias = g_shift * scale``. Forward only aliases the
    cached tensors (``detach``): no arithmetic runs per call.
    """

    @staticmethod
    def forward(ctx, weight, bias, conv_bias, value):
        # ``value`` is the fold the caller looked up, passed in rather than re-read from the cache:
        # another thread may have replaced the cache's entry in between (see FoldCache).
        scale, shift, invstd, mean_eff = value
        ctx.fold = (scale, invstd, mean_eff)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (weight, bias, conv_bias))
        return scale.detach(), shift.detach()

    @staticmethod
    def backward(ctx, g_scale, g_shift):
        scale, invstd, mean_eff = ctx.fold
        need_w, need_b, need_cb = ctx.needs_input_grad[:3]
        g_w = g_b = g_cb = None
        if need_w:
            g = (g_scale if g_scale is not None else torch.zeros_like(scale))
            if g_shift is not None:
                g = g - g_shift * mean_eff
            g_w = (g * invstd).to(ctx.dtypes[0])
        if need_b and g_shift is not None:
            g_b = g_shift.to(ctx.dtypes[1])
        if need_cb and g_shift is not None:
            g_cb = (g_shift * scale).to(ctx.dtypes[2])
        return g_w, g_b, g_cb, None


class FoldCache:
    """Cached eval-mode ``(scale, shift)`` of one conv + norm unit.

    The key holds, for every input of the fold (running mean/var, BN weight/bias, conv bias):
    ``id``, ``_version`` (bumped by in-place edits, ``load_state_dict``'s ``copy_``, optimizer
    steps), ``data_ptr``, device, dtype and shape (changed by ``.to()``, ``.half()``, ``.data =``),
    plus eps and the target dtype. Any change recomputes.

    Inference mode: a fold computed under ``torch.inference_mode`` is made of inference tensors,
    which must never reach a call that records gradients: the cache keeps one entry for folds made
    in inference mode and one for the rest, so threads or callers that alternate between the two
    do not evict each other.

    The cache holds detached tensors only (a cached autograd graph would be freed by the first
    ``backward``). When gradients must reach BN's weight/bias or a conv bias (grad mode on and one
    of them requires grad, e.g. fine-tuning with BN in eval), :class:`_CachedFold` hands the cached
    values out with their analytic gradient, so no per-call arithmetic runs in either case: an
    eval-mode unit is its one fused op (plus ``detach`` aliases when gradients are recorded).

    Thread safety (lock-free): an entry is one immutable ``(key, value)`` tuple, published by a
    single attribute store and read once per call into a local, so a call always uses a value that
    belongs to the key it checked -- never one thread's key with another thread's value, and never
    a fold made in another grad/inference mode. Two threads that miss at once both compute the fold
    and the last store wins (both are correct). Versions are bumped by PyTorch after an in-place
    write completes, so a fold computed from a key is never older than that key: every call that
    starts after an in-place update has finished sees the update. A call that overlaps the update
    reads tensors while they are being written -- a data race in PyTorch itself, as with plain
    modules -- and gets an unspecified mix (the next call recomputes, because the version moved).
    """

    __slots__ = ("_entry", "_entry_inference")

    def __init__(self) -> None:
        self._entry = None  # (key, (scale, shift, invstd, mean_eff)) outside inference mode
        self._entry_inference = None  # the same, computed under inference mode

    def get(self, bn: nn.Module, conv_bias: Tensor | None, acc: torch.dtype) -> tuple[Tensor, Tensor]:
        inputs = (bn.running_mean, bn.running_var, bn.weight, bn.bias, conv_bias)
        if torch.compiler.is_compiling():
            # Under torch.compile the fold is part of the traced graph (the compiler hoists and
            # fuses it); the Python-side cache (ids, versions, inference mode) is not traceable.
            return _fold_graph(bn, conv_bias, acc)
        inference = torch.is_inference_mode_enabled()
        key = (acc, float(bn.eps)) + tuple(_key(t) for t in inputs)
        entry = self._entry_inference if inference else self._entry  # one read: key and value together
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = (key, _fold(bn, conv_bias, acc))
            if inference:
                self._entry_inference = entry
            else:
                self._entry = entry
        value = entry[1]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs[2:]):
            return _CachedFold.apply(bn.weight, bn.bias, conv_bias, value)
        return value[0], value[1]

    def clear(self) -> None:
        self._entry = self._entry_inference = None

    def __reduce__(self):  # caches are not state: a copy or a pickle starts empty
        return (FoldCache, ())


@dataclass
class Act:
    """An activation, possibly with a pending per-channel transform.

    Its value is ``relu?(t * scale + shift)`` when ``scale`` is set (a batch-statistics BN not yet
    applied), else ``t`` itself. ``t`` is (N, C, H, W), channels_last when it came from a fused op.
    """

    t: Tensor
    scale: Tensor | None = None
    shift: Tensor | None = None
    relu: bool = False

    @property
    def pending(self) -> bool:
        return self.scale is not None


def materialize(a: Act, backend: str | None, tape=None) -> Tensor:
    """The value of ``a`` as a tensor: one :func:`~fused_resnet.functional.bn_add_act` if pending."""
    if not a.pending:
        return a.t
    return (F if tape is None else tape).bn_add_act(a.t, a.scale, a.shift, relu=a.relu, backend=backend)


def run_unit(inp: Act, conv: nn.Conv2d, bn: nn.Module, cache: FoldCache, relu: bool, backend: str | None,
             shortcut: Act | None = None, defer: bool = True, tape=None) -> Act:
    """Run ``relu?(bn(conv(inp)) + shortcut?)`` through the fused ops.

    Args:
        inp: the input, maybe with a pending transform (applied in ``conv_stats``' prologue in
            batch mode; materialized first in fold mode, where ``conv_bn_act`` has no prologue).
        conv, bn: the unit's modules (fusable: see :func:`conv_reason`, :func:`norm_reason`).
        cache: this unit's :class:`FoldCache`.
        relu: ReLU at the end.
        shortcut: added before the ReLU; a pending shortcut (a projection's batch-statistics BN,
            no ReLU) is applied on the fly by ``bn_add_act`` ("dual BN").
        defer: in batch mode without a shortcut, return the raw conv output with the BN (+ ReLU)
            pending instead of applying it (the next conv's prologue will).
        tape: a :class:`~fused_resnet.nn._tape.Tape` standing in for the functional API (batch
            mode only: the block's forward is then one autograd node).

    Returns:
        An :class:`Act`; pending only in batch mode with ``defer`` and no shortcut.
    """
    args = conv_args(conv)
    if norm_mode(bn) == FOLD:
        if tape is not None:
            raise AssertionError("fused_resnet: a tape runs batch-mode units only")
        x = materialize(inp, backend)
        scale, shift = cache.get(bn, conv.bias, reference.acc_dtype(x.dtype))
        res = None if shortcut is None else materialize(shortcut, backend)
        return Act(F.conv_bn_act(x, conv.weight, scale, shift, residual=res, relu=relu, backend=backend, **args))

    api = F if tape is None else tape
    z, stats = api.conv_stats(inp.t, conv.weight, inp.scale, inp.shift, inp.relu, backend=backend, **args)
    scale, shift = batch_norm_affine(bn, stats, z, conv.bias, backend, tape)
    if shortcut is None:
        out = Act(z, scale, shift, relu)
        return out if defer else Act(materialize(out, backend, tape))
    if shortcut.pending and shortcut.relu:  # never built by the modules; kept correct anyway
        shortcut = Act(materialize(shortcut, backend, tape))
    return Act(api.bn_add_act(z, scale, shift, residual=shortcut.t, res_scale=shortcut.scale,
                              res_shift=shortcut.shift, relu=relu, backend=backend))


def batch_norm_affine(bn: nn.Module, stats: Tensor, z: Tensor, conv_bias: Tensor | None,
                      backend: str | None, tape=None) -> tuple[Tensor, Tensor]:
    """Training-mode BN of ``z (+ conv_bias)`` as ``(scale, shift)`` applied to ``z``.

    Updates ``bn``'s running statistics and ``num_batches_tracked`` when it is training and tracks
    them, exactly as ``nn.BatchNorm2d`` (``momentum=None`` = cumulative average). A conv bias does
    not change the normalized output but does enter the running mean, so it is added to the batch
    mean before :func:`~fused_resnet.functional.bn_finalize` and folded back into ``shift``.
    With a ``tape`` (:mod:`fused_resnet.nn._tape`) only the taped ops may touch a tensor that
    needs a gradient: no sync, no conv bias; BN parameters in another dtype than the accumulation
    dtype (a model cast to bfloat16) are cast by the tape, which records the cast.
    """
    acc = stats.dtype
    if tape is not None and (isinstance(bn, nn.SyncBatchNorm) or conv_bias is not None):
        raise AssertionError("fused_resnet: this unit cannot run on a tape")
    count = z.numel() // z.shape[1] if z.shape[1] else 0
    track = bn.training and bn.running_mean is not None and bn.running_var is not None
    if isinstance(bn, nn.SyncBatchNorm) and bn.training:
        stats, count = sync_stats(stats, count, bn.process_group)
    if conv_bias is not None:
        stats = torch.stack([stats[0] + conv_bias.to(acc), stats[1]])
    # (no .to() call when the dtype already matches: below autograd it would still dispatch)
    gamma, beta = (p if p is None or p.dtype == acc else p.to(acc) if tape is None else tape.cast(p, acc)
                   for p in (bn.weight, bn.bias))
    scale, shift, _, _ = (F if tape is None else tape).bn_finalize(
        stats, count, gamma, beta,
        bn.running_mean if track else None, bn.running_var if track else None,
        bn.num_batches_tracked if track else None,
        bn.momentum, float(bn.eps), backend=backend,
    )
    if conv_bias is not None:
        shift = shift + conv_bias.to(acc) * scale
    return scale, shift


_warned: set[tuple[int, str]] = set()


def warn_unfused(module: nn.Module, reason: str) -> None:
    """One :class:`~fused_resnet.backends.FallbackWarning` per module instance and reason."""
    key = (id(module), reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"fused_resnet: {type(module).__name__} runs unfused (plain PyTorch modules): {reason}",
                  backends.FallbackWarning, stacklevel=3)


def check_input(x, channels: int, where: str) -> None:
    """Clear errors for a module's input: a 4-D tensor with ``channels`` channels."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{where}: x: expected a 4-D input (N, C, H, W), got {x.dim()}-D with shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{where}: x: expected {channels} input channels (N, {channels}, H, W), got shape "
                         f"{tuple(x.shape)}")


# ----------------------------------------------------------------------------- eval plans
#
# Decision: in fold mode with no gradient wanted (``torch.no_grad()`` / ``torch.inference_mode()``),
# a fused block's forward is always the same few ``conv_bn_act`` calls with the same weights and
# folds, so after one ordinary forward has validated everything, the module keeps an
# :class:`EvalPlan` -- the op, and per unit the weight, folded scale/shift and conv arguments -- and
# later forwards with the same state call ``torch.ops.fused_resnet.conv_bn_act`` directly. That
# skips per call what cannot have changed: the functional layer's validation and backend choice,
# the fold-cache lookup, the unit engine (together ~110 us per conv on a 2-core CPU: ~6 ms of a
# ResNet-50 forward). What can change is in the plan's key, recomputed every call: the input's
# shape/dtype/device, the backend setting and FUSED_RESNET_BACKEND, and per unit the modules'
# identities, train/eval flags, eps, conv arguments and every tensor's identity, version, data
# pointer, dtype and shape (:func:`_key`) -- so in-place updates, ``.data`` swaps, ``.to()`` and
# ``train()``/``eval()`` all rebuild the plan through an ordinary (validating) forward.
# Only the C++ backends (cpu, cuda), whose ops validate their arguments themselves, take plans;
# autocast, torch.compile tracing and an active :func:`fused_resnet.backends.trace` take the
# ordinary path, as does everything with FUSED_RESNET_FAST_EVAL=0 (the switch used to measure it).
# A plan holds references to the weights it was built from; it is dropped by copies and pickles.
#
# Writing into a dead residual. A block's last conv reads its shortcut once and writes an output
# of the same shape; when nothing else will read the shortcut, the output can go into its memory
# (``conv_bn_act_residual_``, oneDNN's "sum" post-op on the CPU). That saves allocating -- and,
# for large activations, page-faulting in -- one fresh buffer per block: ResNet-50 layer1's
# block-end conv took 13.7-15 ms into a fresh 25.7 MB buffer vs ~6 ms into a warm one (batch 8,
# 2 threads; what Inductor's freezing path does). Whether the shortcut is dead is decided where
# that is known: a projection shortcut is the plan's own temporary (always dead); an identity
# shortcut is the block's input, dead only when the caller says so -- a
# :class:`~fused_resnet.nn.Stage` passes each block the previous block's output, which nothing
# else can see when no hook is registered. FUSED_RESNET_EVAL_INPLACE=0 turns it off (to measure it).

FAST_EVAL_ENV = "FUSED_RESNET_FAST_EVAL"
INPLACE_ENV = "FUSED_RESNET_EVAL_INPLACE"
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)
_PLAN_BACKENDS = ("cpu", "cuda")


def fast_eval_ready(x) -> bool:
    """Whether this call may use an :class:`EvalPlan` (per-call conditions only; the plan's key
    covers the module state)."""
    return (
        not torch.is_grad_enabled()
        and isinstance(x, Tensor)
        and not torch.compiler.is_compiling()
        and not backends.tracing()
        and not torch.is_autocast_enabled(x.device.type)
        and os.environ.get(FAST_EVAL_ENV, "1").strip() != "0"
    )


def plan_key_head(x: Tensor, backend: str | None) -> tuple:
    """The part of a plan key that does not depend on the module's units."""
    return (tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled(), backend,
            os.environ.get(backends._ENV))


def unit_state(conv: nn.Module, bn: nn.Module) -> tuple:
    """Everything about a unit that its plan entry depends on (see the comment above). Computed
    before the module knows whether it can fuse, so any module is accepted (a GroupNorm, an
    Identity, a non-Conv2d): what it lacks reads as None."""

    def a(m, name):
        return getattr(m, name, None)

    return (
        id(conv), id(bn), type(conv), type(bn), bn.training, a(bn, "track_running_stats"), a(bn, "eps"),
        a(conv, "stride"), a(conv, "padding"), a(conv, "dilation"), a(conv, "groups"), a(conv, "padding_mode"),
        _key(a(conv, "weight")), _key(a(conv, "bias")),
        _key(a(bn, "running_mean")), _key(a(bn, "running_var")), _key(a(bn, "weight")), _key(a(bn, "bias")),
    )


class EvalPlan:
    """A fused module's fold-mode forward as direct op calls (see the comment above this class).

    ``units[i]`` is ``(weight, scale, shift, stride, padding, dilation, groups)``;
    :meth:`conv` runs unit ``i`` as one ``conv_bn_act``. ``stem``: set by the models' stem when it
    runs conv + pool through :class:`~fused_resnet.nn._onednn_stem.OneDNNStem` instead.

    :meth:`conv_into` is the block end for a residual nobody else holds (see "Writing into a dead
    residual" above): ``conv_bn_act_residual_`` where that pays -- the ``cpu`` backend in float32,
    where oneDNN accumulates into the residual instead of filling a fresh buffer -- else
    :meth:`conv`."""

    __slots__ = ("key", "op", "op_into", "decision", "units", "stem", "writes_residual")

    def __init__(self, key: tuple, decision: backends.Decision, units: list[tuple], dtype: torch.dtype) -> None:
        self.key = key
        self.op = torch.ops.fused_resnet.conv_bn_act.default
        self.op_into = torch.ops.fused_resnet.conv_bn_act_residual_.default
        self.decision = decision
        self.units = units
        self.stem = None
        # On CUDA, and for other dtypes on the CPU, the op computes out of place and copies.
        self.writes_residual = decision.backend == "cpu" and dtype == torch.float32

    def conv(self, i: int, x: Tensor, residual: Tensor | None = None, relu: bool = True) -> Tensor:
        w, scale, shift, stride, padding, dilation, groups = self.units[i]
        # A plan only runs with grad mode off, where the op's (Python) autograd kernel would only
        # redispatch below autograd: go there directly (~20 us per call on the CPU measured here).
        with _below_autograd():
            return self.op(x, w, scale, shift, residual, stride, padding, dilation, groups, relu)

    def conv_into(self, i: int, x: Tensor, residual: Tensor) -> Tensor:
        """``relu(unit i of x + residual)``, written into ``residual`` when that pays (and
        FUSED_RESNET_EVAL_INPLACE is not 0); ``residual`` must have no other use."""
        if not self.writes_residual or os.environ.get(INPLACE_ENV, "1").strip() == "0":
            return self.conv(i, x, residual)
        w, scale, shift, stride, padding, dilation, groups = self.units[i]
        with _below_autograd():
            self.op_into(x, w, scale, shift, residual, stride, padding, dilation, groups, True)
        return residual

    def record(self) -> None:
        backends.record(self.decision)

    @staticmethod
    def build(key: tuple, x: Tensor, units: list[tuple[nn.Conv2d, nn.Module, FoldCache]],
              backend: str | None) -> EvalPlan | None:
        """A plan for ``units`` (run with the module's ``backend`` setting) after an ordinary
        forward of ``x`` ran them; None when a unit is not in fold mode or the backend chosen for
        them is not a C++ one. The choice is made again here, not read from
        :func:`~fused_resnet.backends.last_decision` (another thread may have recorded since)."""
        decision = backends.choose("conv_bn_act", x.device, x.dtype, backend)
        if decision.backend not in _PLAN_BACKENDS:
            return None
        if any(norm_mode(bn) != FOLD for _, bn, _ in units):
            return None
        acc = reference.acc_dtype(x.dtype)
        entries = []
        for conv, bn, cache in units:
            scale, shift = cache.get(bn, conv.bias, acc)
            a = conv_args(conv)
            entries.append((conv.weight, scale, shift, list(a["stride"]), list(a["padding"]),
                            list(a["dilation"]), a["groups"]))
        return EvalPlan(key, decision, entries, x.dtype)


class PlanSlot:
    """Holds a module's current :class:`EvalPlan` (or None). Not state: copies and pickles get an
    empty slot (the plan refers to the original's tensors)."""

    __slots__ = ("plan",)

    def __init__(self) -> None:
        self.plan: EvalPlan | None = None

    def __reduce__(self):
        return (PlanSlot, ())
