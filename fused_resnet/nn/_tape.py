"""One autograd node per fused block in training: the block's ops on a tape.

Decision: in batch mode with gradients wanted, a fused block's forward is a short, fixed chain of
``conv_stats`` / ``bn_finalize`` / ``bn_add_act`` calls (9-12 ops in a Bottleneck). Run through
the public functional API, each call pays for argument checks, a backend choice and
``torch.library.register_autograd``'s generic wrapper, and each becomes its own autograd node with
its own Python backward wrapper: ~50 ms of Python per ResNet-50 training step on the 2-core CPU
measured (``benchmarks/NOTES.md``, 2026-12-05), during which the OpenMP workers fall asleep and the
next convolutions pay for waking them. Here the block runs its unit engine
(:func:`~fused_resnet.nn._fusion.run_unit`) with a :class:`Tape` in place of the functional API,
inside ONE ``torch.autograd.Function``: the tape calls the C++ ops directly below autograd and
records, per op, the same context the op's registered autograd would save (the ``_setup_*``
functions of :mod:`fused_resnet.ops`); the block's backward replays the tape in reverse through
the same backward formulas (``fused_resnet.ops``). Same kernels, same formulas, same results.

Where it applies (:func:`tape_ready` per call, the module's ``_tape_tensors`` per block): grad mode
on, not under ``torch.compile`` tracing, :func:`fused_resnet.backends.trace`, or
``FUSED_RESNET_FAST_TRAIN=0``; every unit in batch mode with a plain ``BatchNorm2d`` (not
``SyncBatchNorm``: its gather has its own autograd; its parameters in any floating dtype, cast
by the tape) and a bias-free conv; a downsample that is a
bare (conv, BN) pair; a C++ backend (cpu/cuda) for the call. Everything else runs op by op as
before. Saved tensors go through ``ctx.save_for_backward``, so they are freed after backward and
a second backward without ``retain_graph=True`` raises PyTorch's usual error. Double backward is
not supported (as for the ops).

Recomputed block inputs (``FUSED_RESNET_RECOMPUTE``, default on). A block's input is usually the
output of the block before it, ``relu(z3 * scale + shift + residual)``, whose ingredients that
block's node saves anyway (its ``bn_add_act`` backward needs them). So when a taped block's input is the
untouched output of another taped block (its ``grad_fn`` is that block's node, its version
unchanged), the block does not save the input: it keeps a link to the producing node, and its
backward recomputes the input with the same ``bn_add_act`` kernel from the producer's saved
tensors -- bit for bit the forward's value. Chained identity shortcuts recompute back to the
stage's projection block (whose shortcut is its own conv output), caching each recomputed output
on its producer until the consumer's backward (or the producer's own) is done, so a stage's
outputs are recomputed once each and only while that stage's backward runs. Cost: one elementwise
pass per linked block per step; saving: every block output. The models' stem is taped too
(:meth:`Tape.max_pool2d`): its ``relu(bn(z))`` and the pool's indices are recomputed in its
backward, and its pooled output by the first block (``benchmarks/NOTES.md``, tenth session, for
the counted figures). Reading the
producer's saved tensors goes through autograd, so a freed graph raises its usual error, saved-tensor
hooks (checkpointing, offloading) apply, and ``retain_graph=True`` keeps everything needed.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .. import backends
from .. import functional as F
from .. import ops as _ops
from ._fusion import _PLAN_BACKENDS, BATCH, _below_autograd, norm_mode

FAST_TRAIN_ENV = "FUSED_RESNET_FAST_TRAIN"
RECOMPUTE_ENV = "FUSED_RESNET_RECOMPUTE"


def tape_ready(x) -> bool:
    """Whether this call may run on a :class:`Tape` (per-call conditions; the block checks its units)."""
    return (
        torch.is_grad_enabled()
        and isinstance(x, Tensor)
        and not torch.compiler.is_compiling()
        and not backends.tracing()
        and os.environ.get(FAST_TRAIN_ENV, "1").strip() != "0"
    )


class _OpCtx:
    """Stands in for autograd's ctx in the ops' ``_setup_*`` and backward formulas. Saved tensors
    are kept as indices into the block node's own saved tensors (so autograd owns their lifetime)."""

    __slots__ = ("needs_input_grad", "saved_tensors", "saved_idx", "tape", "conv", "relu", "in_relu",
                 "has_prologue", "count", "dtype", "pool")

    def save_for_backward(self, *tensors) -> None:
        self.saved_idx = tuple(self.tape.save(t) for t in tensors)


def _setup_cast(ctx, inputs, output) -> None:
    ctx.dtype = inputs[0].dtype


def _cast_backward(ctx, grad):
    return (grad.to(ctx.dtype),)


def _setup_pool(ctx, inputs, output) -> None:
    add_args, y, ctx.pool = inputs
    if add_args is None:
        ctx.relu = None
        ctx.save_for_backward(y)
    else:  # recompute y = bn_add_act(*add_args) (tensors that op saved anyway)
        ctx.relu = add_args[6]
        ctx.save_for_backward(*add_args[:6])


def _pool_backward(ctx, grad):
    saved = ctx.saved_tensors
    if ctx.relu is None:
        y = saved[0]
    else:
        y = torch.ops.fused_resnet.bn_add_act.default(*saved, ctx.relu)
    _, indices = torch.ops.aten.max_pool2d_with_indices.default(y, *ctx.pool)
    g = torch.ops.aten.max_pool2d_with_indices_backward.default(grad, y, *ctx.pool, indices)
    return None, g, None


class Tape:
    """The functional API's ``conv_stats`` / ``bn_finalize`` / ``bn_add_act`` for one block's
    forward, run directly on the C++ ops and recorded for :class:`BlockFunction`'s backward.

    Tensors are named by their ``id``: every tensor the forward records is kept alive until
    :meth:`close`, so no two of them share one; after that the ids are only names (a tensor made
    during backward may reuse one, but is never looked up by it)."""

    def __init__(self, inputs: tuple) -> None:
        self._alive: list[Tensor] = []
        self._saved: list = []
        self._saved_idx: dict[int, int] = {}
        self.entries: list[tuple] = []
        self._last_add = self._last_pool = None
        self.input_keys = tuple(None if t is None else self._key_of(t) for t in inputs)
        self._diff = {k for k, t in zip(self.input_keys, inputs, strict=True) if t is not None and t.requires_grad}

    def _key_of(self, t: Tensor) -> int:
        self._alive.append(t)
        return id(t)

    def save(self, t) -> int | None:
        if t is None:
            return None
        i = self._saved_idx.get(id(t))
        if i is None:
            i = self._saved_idx[id(t)] = len(self._saved)
            self._saved.append(t)  # alive until close(): its id stays its own
        return i

    def _record(self, backward, setup, inputs: tuple, outputs: tuple) -> None:
        in_keys = tuple(self._key_of(t) if isinstance(t, Tensor) else None for t in inputs)
        needs = tuple(k is not None and k in self._diff for k in in_keys)
        if not any(needs):
            return
        out_keys = tuple(self._key_of(t) for t in outputs)
        self._diff.update(out_keys)
        ctx = _OpCtx()
        ctx.tape, ctx.needs_input_grad, ctx.saved_idx = self, needs, ()
        setup(ctx, inputs, outputs)
        ctx.tape = None
        self.entries.append((backward, ctx, in_keys, out_keys))

    def _autocast(self, t):
        """Autocast's rule for an activation argument (``fused_resnet.ops.autocast_cast``), applied
        here rather than inside the op so that the tape records the tensor the op really used; the
        cast is recorded too, its backward casting the gradient back."""
        if t is None or not torch.is_autocast_enabled(t.device.type):
            return t
        c = _ops.autocast_cast(t, t.device.type, torch.get_autocast_dtype(t.device.type))
        if c is not t:
            self._record(_cast_backward, _setup_cast, (t,), (c,))
        return c

    def cast(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t.to(dtype)``, recorded (its backward casts the gradient back): BN parameters of a
        model cast to a 16-bit dtype, which the ops take in the accumulation dtype."""
        c = t.to(dtype)
        self._record(_cast_backward, _setup_cast, (t,), (c,))
        return c

    # ---- the functional API's signatures (backend= is fixed for the whole tape)

    def conv_stats(self, x, weight, in_scale=None, in_shift=None, in_relu=False, stride=1, padding=0,
                   dilation=1, groups=1, backend=None):
        x, weight = self._autocast(x), self._autocast(weight)
        args = (x, weight, in_scale, in_shift, bool(in_relu), list(stride), list(padding), list(dilation), groups)
        out = torch.ops.fused_resnet.conv_stats.default(*args)
        self._record(_ops._backward_conv_stats, _ops._setup_conv_stats, args, out)
        return out

    def bn_finalize(self, stats, count, gamma=None, beta=None, running_mean=None, running_var=None,
                    num_batches_tracked=None, momentum=0.1, eps=1e-5, backend=None):
        F.check_train_count(count)
        args = (stats, count, gamma, beta, float(eps))
        out = torch.ops.fused_resnet.bn_finalize.default(*args)
        self._record(_ops._backward_bn_finalize, _ops._setup_bn_finalize, args, out)
        if running_mean is not None:
            torch.ops.fused_resnet.bn_update_running_stats.default(
                stats, count, running_mean, running_var, num_batches_tracked,
                None if momentum is None else float(momentum))
        return out

    def bn_add_act(self, z, scale, shift, residual=None, res_scale=None, res_shift=None, relu=True, backend=None):
        z, residual = self._autocast(z), self._autocast(residual)
        args = (z, scale, shift, residual, res_scale, res_shift, bool(relu))
        y = torch.ops.fused_resnet.bn_add_act.default(*args)
        self._record(_ops._backward_bn_add_act, _ops._setup_bn_add_act, args, (y,))
        self._last_add = (args, y)
        return y

    def max_pool2d(self, y, kernel_size, stride, padding, dilation, ceil_mode):
        """``aten.max_pool2d_with_indices`` keeping neither the indices nor its input when the
        input is the last ``bn_add_act``'s output (and ``FUSED_RESNET_RECOMPUTE`` is not 0): the
        backward recomputes both from that op's saved tensors (the stem's ``relu(bn(z))`` and the
        indices are then never stored). Otherwise the input is saved and only the indices are
        recomputed (a max pool's cheapest part to redo)."""
        pool = (list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))
        out, _ = torch.ops.aten.max_pool2d_with_indices.default(y, *pool)
        last = self._last_add
        from_add = last is not None and last[1] is y and recompute_on()
        inputs = (last[0] if from_add else None, y, pool)
        self._record(_pool_backward, _setup_pool, inputs, (out,))
        self._last_pool = (y, out, pool)
        return out

    # ----

    def recipe(self, output: Tensor) -> tuple | None:
        """How to recompute ``output`` from the saved tensors (call before :meth:`close`): the
        saved indices of the last ``bn_add_act``'s tensor arguments (None for an absent one), its
        ``relu`` and the max pool applied to its result (or None), or None when ``output`` is not
        that op's output (or its pool's) or an argument is unsaved."""
        last, lp, pool = self._last_add, self._last_pool, None
        if lp is not None and lp[1] is output:  # the stem's pool of its relu(bn(z))
            output, pool = lp[0], lp[2]
        if last is None or last[1] is not output:
            return None
        args = last[0]
        idx = tuple(None if a is None else self._saved_idx.get(id(a)) for a in args[:6])
        if any(i is None and a is not None for i, a in zip(idx, args[:6], strict=True)):
            return None
        return idx, args[6], pool

    def close(self, output: Tensor) -> tuple[list, int]:
        """End of the forward: the tensors to save and the output's key; forgets everything else."""
        out_key = id(output)  # if no recorded op made it, it carries no gradient to anything
        saved = self._saved
        self._alive, self._saved, self._saved_idx, self._diff = [], [], {}, set()
        self._last_add = self._last_pool = None
        return saved, out_key

    def backward(self, saved: tuple, out_key: int, grad: Tensor) -> tuple:
        """Gradients of the block's inputs (in :meth:`__init__`'s order) from the output's ``grad``."""
        grads = {out_key: grad}
        for backward, ctx, in_keys, out_keys in reversed(self.entries):
            g_out = [grads.pop(k, None) for k in out_keys]
            if all(g is None for g in g_out):
                continue
            ctx.saved_tensors = tuple(None if i is None else saved[i] for i in ctx.saved_idx)
            try:
                g_in = backward(ctx, *g_out)
            finally:
                ctx.saved_tensors = ()
            for k, g in zip(in_keys, g_in, strict=True):
                if k is None or g is None:
                    continue
                prev = grads.get(k)
                if prev is None:
                    grads[k] = g
                elif prev.dim() == 4:
                    # An activation gradient used twice (a block's input: conv1 and the shortcut).
                    # The formulas in fused_resnet.ops return every 4-D gradient freshly made and
                    # for one input only, so it is ours to add into (autograd adds in place too).
                    prev.add_(g)
                else:
                    grads[k] = prev + g  # (K,) vectors may be returned for two inputs at once
        return tuple(None if k is None else grads.get(k) for k in self.input_keys)


def recompute_on() -> bool:
    """Whether taped blocks recompute their inputs (``FUSED_RESNET_RECOMPUTE``, default on)."""
    return os.environ.get(RECOMPUTE_ENV, "1").strip() != "0"


def _producer(x: Tensor):
    """The taped block node whose untouched output ``x`` is and that can recompute it, or None."""
    node = x.grad_fn
    if type(node) is not _BLOCK_NODE:
        return None
    if node.out_recipe is None or node.out_version != x._version:
        return None
    return node


def _saved_of(node) -> tuple:
    """``node.saved_tensors``, unpacked once per backward: kept on the node for its own backward,
    since saved-tensor hooks may allow one unpack only (non-reentrant checkpointing does)."""
    if node.saved_unpacked is None:
        node.saved_unpacked = node.saved_tensors
    return node.saved_unpacked


def _recomputed_output(node) -> Tensor:
    """The output of the taped block ``node``, recomputed from its saved tensors (see the module
    doc). Walks back through chained identity shortcuts first, so each output is computed once and
    cached on its node (``out_cache``) until a consumer's or the node's own backward drops it."""
    chain = []
    n = node
    while n.out_cache is None:
        chain.append(n)
        idx, in_slot = n.out_recipe[0], n.in_slot
        if in_slot is None or idx[3] != in_slot[1]:
            break  # the residual is saved by n itself (a projection's output, or an unlinked input)
        n = in_slot[0]  # the residual is n's own input, recomputed by its producer
    for n in reversed(chain):
        saved = _saved_of(n)
        (idx, relu, pool), in_slot = n.out_recipe, n.in_slot
        args = [None if i is None else saved[i] for i in idx]
        if in_slot is not None and idx[3] == in_slot[1]:
            args[3] = in_slot[0].out_cache
        with torch.no_grad(), _below_autograd():
            y = torch.ops.fused_resnet.bn_add_act.default(*args, relu)
            if pool is not None:
                y = torch.ops.aten.max_pool2d_with_indices.default(y, *pool)[0]
            n.out_cache = y
    return node.out_cache


class BlockFunction(torch.autograd.Function):
    """``run(tape)`` -- a block's forward written against the functional API -- as one autograd
    node. ``tensors`` are everything in it that may need a gradient (input and parameters).

    Node attributes: ``in_slot`` = (producer node, saved index) when the input is recomputed
    rather than saved; ``out_recipe`` (:meth:`Tape.recipe`), ``out_version`` and ``out_cache`` for
    consumers that recompute this block's output; ``saved_unpacked`` (:func:`_saved_of`)."""

    @staticmethod
    def forward(ctx, run, *tensors):
        tape = Tape(tensors)
        with _below_autograd():
            y = run(tape)
        recompute = recompute_on()
        ctx.out_recipe = tape.recipe(y) if recompute else None
        ctx.out_cache, ctx.in_slot, ctx.saved_unpacked = None, None, None
        x = tensors[0]
        saved, ctx.out_key = tape.close(y)
        producer = _producer(x) if recompute else None
        if producer is not None:
            slot = next((i for i, t in enumerate(saved) if t is x), None)
            if slot is not None:
                saved[slot] = None  # not kept: recomputed in backward from the producer's tensors
                ctx.in_slot = (producer, slot)
        ctx.save_for_backward(*saved)
        ctx.tape = tape
        ctx.out_version = y._version
        return y

    @staticmethod
    def backward(ctx, grad):
        saved = _saved_of(ctx)
        in_slot = ctx.in_slot
        try:
            if in_slot is not None:
                saved = list(saved)
                saved[in_slot[1]] = _recomputed_output(in_slot[0])
            grads = ctx.tape.backward(saved, ctx.out_key, grad)
        finally:
            ctx.out_cache, ctx.saved_unpacked = None, None
            if in_slot is not None:
                in_slot[0].out_cache = None  # this block was its only reader still to come
        return (None, *grads)


_BLOCK_NODE = BlockFunction._backward_cls


def unit_ok(conv, bn) -> bool:
    """Whether a (conv, norm) unit may run on a tape this call (see the module doc). BN parameters
    may be in any floating dtype: the tape casts them to the accumulation dtype."""
    return (
        isinstance(bn, nn.BatchNorm2d) and not isinstance(bn, nn.SyncBatchNorm)
        and norm_mode(bn) == BATCH
        and getattr(conv, "bias", None) is None
    )


def tape_tensors(x: Tensor, units, backend: str | None) -> list[Tensor] | None:
    """The tensors of a taped call of ``units`` ((conv, norm) pairs) on ``x``: ``x``, then each
    unit's conv weight, BN weight and BN bias; or None when a unit may not run taped
    (:func:`unit_ok`) or an op's backend is not a C++ one (:func:`decide`). When it may, the ops'
    backend decisions are recorded (``backends.last_decision``)."""
    tensors = [x]
    for conv, norm in units:
        if not unit_ok(conv, norm):
            return None
        tensors += [conv.weight, norm.weight, norm.bias]
    decisions = decide(x, backend)
    if decisions is None:
        return None
    for d in decisions:
        backends.record(d)
    return tensors


def decide(x: Tensor, backend: str | None) -> list[backends.Decision] | None:
    """The decisions for a taped call's ops, or None when any of them is not a C++ backend."""
    decisions = [backends.choose(op, x.device, x.dtype, backend) for op in ("conv_stats", "bn_finalize", "bn_add_act")]
    # the C++ backends, whose ops check their own arguments (as for eval plans)
    return decisions if all(d.backend in _PLAN_BACKENDS for d in decisions) else None
