"""Implicit-GEMM convolution over NHWC with a fused prologue and epilogue -- one launch per op.

GEMM view (per group ``g``): ``M = N * P * Q`` output pixels (rows), ``Kg = K / groups`` output
channels (columns), reduction over ``R * S * Cg`` (``Cg = C / groups``) taken as an unrolled loop
over the ``R x S`` taps with an inner loop over input-channel blocks, so every loaded tile is
contiguous along C (NHWC). A 1x1 / stride-1 / unpadded / ungrouped convolution is compiled as a
plain GEMM (``IS_GEMM``: row ``m`` of the input *is* pixel ``m``, no index arithmetic).

Prologue (compile-time selected): ``a = relu?(x * in_scale + in_shift)`` in float32, then zero
where the tap falls into the padding (zero padding applies to the *transformed* input), rounded
to x's dtype before ``tl.dot`` (as the reference rounds the transformed input).

Epilogue (compile-time selected), from the float32 accumulator:

* ``conv_bn_act``: ``y = relu?(acc * scale + shift + residual?)`` rounded once to x's dtype.
* ``conv_stats``: ``z = acc`` rounded to x's dtype, plus per-channel statistics of the rounded
  ``z``. Statistics are deterministic partials: for every block of ``STAT_ROWS`` (16) rows the
  kernel writes that block's (mean, M2) per channel into ``(cdiv(M, 16), K)`` buffers; a second
  small kernel merges them in a fixed order with Chan's formula. The partial layout does not
  depend on the tile size, so every autotuning candidate writes exactly the same slots: there is
  no accumulation (no atomics), nothing to reset between tuning runs, and the merge order does not
  depend on the chosen config. The values of ``z`` (and so of its statistics) do: the tile's
  BLOCK_K sets the summation order, so results are bitwise reproducible for a given tuned config
  only (a config chosen by timing may differ between machines or tuning-cache states).

Precision: float32 inputs use TF32 tensor cores when ``torch.backends.cudnn.allow_tf32`` is True
(PyTorch's default for convolutions, as cuDNN does), IEEE float32 otherwise; float16/bfloat16
multiply in their dtype and accumulate in float32. Addresses are computed in int64 (pixel index
times channels can pass 2^31 at large batch).

Autotuning: :func:`triton.autotune` over block sizes / warps / stages, keyed on the GEMM shape,
the convolution geometry, the epilogue and the float32 input precision, with
``cache_results=True`` where the installed triton has it (3.2+): results persist in triton's
cache directory, so a second process does not re-tune. The menu and the per-shape pruning (at
most 3 candidates per shape; derived BLOCK_K; shared-memory and one-wave rules) are in
:mod:`._tuning`, unmeasured so far. Under the interpreter one small config is used (no tuning).

Reduction loop: one flat loop over (tap, channel block) rather than a loop per tap, so the
software pipeliner (``num_stages``) overlaps loads across taps. With few input channels (the
stem's C = 3; :func:`._tuning.packs_taps`) the loop runs over (kernel row, run block) instead:
the S taps of a kernel row read S adjacent NHWC pixels, one contiguous run of ``S * C`` elements,
so one K step covers several taps (``PACK_S``); the weight is packed ``(R, S, C, K)``, the same
``s * C + c`` order, so both operands index the run alike.

Split-K (``SPLIT_K > 1``, chosen by the launcher: :func:`._tuning.split_k`, only where even 64x64
tiles leave SMs idle, i.e. late layers at small batch): ``SPLIT_K`` programs share an output tile,
each running one contiguous share of the reduction loop and storing its float32 partial sum in a
``(SPLIT_K, M, K)`` workspace; :func:`splitk_epilogue_kernel` then adds the shares in split order
(deterministic: no atomics) and runs the same epilogue (:func:`_epilogue`) the unsplit kernel runs.
The sum's order differs from the unsplit kernel's, so a split result may differ from an unsplit
one in the last bits, as between two tile configs.
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl

from . import _tuning, interpret_mode
from ._launch import launch
from ._pack import pack_weight, packed_weight  # noqa: F401  (pack_weight: re-exported)

STAT_ROWS = 16  # rows per statistics partial; every BLOCK_M is a multiple of it


def _conv_configs():
    """The autotuner's menu (:func:`._tuning.menu`); one small config under the interpreter."""
    if interpret_mode():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for (bm, bn, bk, w, st) in _tuning.menu()]


def _config_tuple(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


@functools.cache
def _device_limits(index: int) -> tuple[int, int]:
    """(opt-in shared memory per block in bytes, SM count) of CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or _tuning.DEFAULT_SMEM
    return int(smem), int(props.multi_processor_count)


def _prune(configs, named_args, **kwargs):
    """Keep at most three candidates for this shape (:func:`._tuning.select` says which and why)."""
    x = named_args["x_ptr"]
    if len(configs) <= 1 or not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        return configs
    smem, n_sm = _device_limits(x.device.index if x.device.index is not None else torch.cuda.current_device())
    packed = bool(kwargs.get("PACK_S"))
    run = _tuning.reduction_run(named_args["Cg"], kwargs.get("S", 1), packed)
    return _tuning.select(configs, named_args["M"], named_args["Kg"], run, named_args["GROUPS"],
                          x.element_size(), smem, n_sm, as_tuple=_config_tuple, packed=packed,
                          split=int(kwargs.get("SPLIT_K", 1)))


def _split_k(x: torch.Tensor, m: int, kg: int, groups: int, r: int, s: int, cg: int, packed: bool) -> int:
    """Split-K factor of one launch (:func:`._tuning.split_k`; ``FUSED_RESNET_TRITON_SPLIT_K``
    forces one; no split under the interpreter unless forced)."""
    forced = _tuning.forced_split_k()
    if forced is not None:
        return forced
    if x.device.type != "cuda":
        return 1
    _, n_sm = _device_limits(x.device.index if x.device.index is not None else torch.cuda.current_device())
    steps = _tuning.reduction_steps(r, s, cg, x.element_size(), packed)
    return _tuning.split_k(m, kg, groups, steps, n_sm)


@triton.jit
def _epilogue(acc, out_offs, out_mask, mask_m, k_glob, mask_n, slot0,
              out_ptr, scale_ptr, shift_ptr, res_ptr, pmean_ptr, plo_ptr, pm2_ptr, M, K,
              STATS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STAT_ROWS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The fused epilogue of one (BLOCK_M x BLOCK_N) tile from its float32 accumulator: the
    conv_bn_act output, or conv_stats' rounded z plus the statistics partials of its rows (rows
    ``slot0 * STAT_ROWS ...``; ``out_offs`` / ``out_mask`` address the tile in the (M, K) output)."""
    if STATS:
        z = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_offs, z, mask=out_mask)
        # Statistics of z as stored (rounded), per block of STAT_ROWS rows.
        zf = tl.where(out_mask, z.to(tl.float32), 0.0)
        NB: tl.constexpr = BLOCK_M // STAT_ROWS
        z3 = tl.reshape(zf, (NB, STAT_ROWS, BLOCK_N))
        cnt = tl.sum(tl.reshape(mask_m.to(tl.float32), (NB, STAT_ROWS)), axis=1)  # (NB,)
        inv_cnt = 1.0 / tl.maximum(cnt, 1.0)[:, None]
        # The block mean as an unevaluated sum hi + lo: hi is the float32 mean, lo the mean of
        # the (exact, as z is close to hi) deviations from it. Keeping lo is what keeps the merged
        # M2 accurate when |mean| >> std: hi alone carries up to an ulp of |mean| of error.
        hi = tl.sum(z3, axis=1) * inv_cnt  # (NB, BLOCK_N)
        valid3 = tl.reshape(mask_m, (NB, STAT_ROWS))
        dev = tl.where(valid3[:, :, None], z3 - hi[:, None, :], 0.0)
        lo = tl.sum(dev, axis=1) * inv_cnt
        m2 = tl.maximum(tl.sum(dev * dev, axis=1) - lo * lo * cnt[:, None], 0.0)
        slot = slot0 + tl.arange(0, NB)
        n_slots = tl.cdiv(M, STAT_ROWS)
        p_offs = slot.to(tl.int64)[:, None] * K + k_glob[None, :]
        p_mask = (slot < n_slots)[:, None] & mask_n[None, :]
        tl.store(pmean_ptr + p_offs, hi, mask=p_mask)
        tl.store(plo_ptr + p_offs, lo, mask=p_mask)
        tl.store(pm2_ptr + p_offs, m2, mask=p_mask)
    else:
        sc = tl.load(scale_ptr + k_glob, mask=mask_n, other=0.0)
        sh = tl.load(shift_ptr + k_glob, mask=mask_n, other=0.0)
        y = acc * sc[None, :] + sh[None, :]
        if HAS_RES:
            y += tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


_AUTOTUNE_KW = {}
if "cache_results" in inspect.signature(triton.autotune).parameters:  # triton >= 3.2
    _AUTOTUNE_KW["cache_results"] = True


@triton.autotune(
    configs=_conv_configs(),
    key=["M", "Kg", "Cg", "H", "W", "R", "S", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "GROUPS",
         "PROLOGUE", "STATS", "HAS_RES", "INPUT_PRECISION", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune},
    **_AUTOTUNE_KW,
)
@triton.jit
def conv_kernel(
    # pointers
    x_ptr,  # (N, H, W, C) x.dtype, contiguous NHWC
    w_ptr,  # (GROUPS, R, S, Cg, Kg) x.dtype, packed by pack_weight
    out_ptr,  # (N, P, Q, K) x.dtype, contiguous NHWC
    scale_ptr, shift_ptr,  # (K,) float32 epilogue (conv_bn_act)
    res_ptr,  # (N, P, Q, K) x.dtype residual (conv_bn_act with HAS_RES)
    in_scale_ptr, in_shift_ptr,  # (C,) float32 prologue
    pmean_ptr, plo_ptr, pm2_ptr,  # (cdiv(M, STAT_ROWS), K) float32 partials: mean = hi + lo, M2 (STATS)
    ws_ptr,  # (SPLIT_K, M, K) float32 split-K partial sums (SPLIT_K > 1)
    # sizes
    H, W, C, P, Q, K, M, Cg, Kg,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    GROUPS,  # grid axis 2 has GROUPS * SPLIT_K programs; a key of the autotuner, not compiled in
    R: tl.constexpr, S: tl.constexpr,
    # what to fuse
    PROLOGUE: tl.constexpr,  # apply the input transform at all
    HAS_IN_SCALE: tl.constexpr, HAS_IN_SHIFT: tl.constexpr, IN_RELU: tl.constexpr,
    STATS: tl.constexpr,  # conv_stats epilogue (raw z + partials); else the conv_bn_act epilogue
    HAS_RES: tl.constexpr, RELU: tl.constexpr,
    IS_GEMM: tl.constexpr,  # 1x1, stride 1, no padding, one group: a plain GEMM
    PACK_S: tl.constexpr,  # reduce over contiguous (s, c) runs of S * C, one per kernel row (few channels)
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee" (float32 inputs only)
    SPLIT_K: tl.constexpr,  # programs sharing one output tile's reduction (1: none; chosen by the launcher)
    STAT_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    g = pid_z // SPLIT_K
    sk = pid_z - g * SPLIT_K  # which contiguous share of the reduction loop this program runs

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    m64 = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # channel within the group
    mask_n = offs_n < Kg
    k_glob = g * Kg + offs_n
    offs_c = tl.arange(0, BLOCK_K)

    if not IS_GEMM:
        pq = P * Q
        n_img = (m64 // pq)
        rem = m64 % pq
        p = rem // Q
        q = rem % Q
        h0 = p * STRIDE_H - PAD_H
        w0 = q * STRIDE_W - PAD_W

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, channel block), so the compiler's software pipeliner (num_stages)
    # overlaps the loads of the next tap with the current MMA: with a loop per tap, a layer with
    # C <= BLOCK_K (layer1: C = 64) would run 9 one-iteration loops and nothing would overlap.
    if PACK_S:
        # One run of S * Cg elements per kernel row (one group, W-dilation 1): element j of the run
        # is channel j % Cg of the pixel j // Cg taps to the right, in x as in the packed weight.
        n_cb = tl.cdiv(S * Cg, BLOCK_K)
        n_it = R * n_cb
    else:
        n_cb = tl.cdiv(Cg, BLOCK_K)
        n_it = R * S * n_cb
    if SPLIT_K > 1:
        per = tl.cdiv(n_it, SPLIT_K)
        it_lo = sk * per
        it_hi = tl.minimum(it_lo + per, n_it)  # an empty share (it_lo >= n_it) stores zeros
    else:
        it_lo = 0
        it_hi = n_it
    for it in range(it_lo, it_hi):
        if PACK_S:
            r = it // n_cb
            jj = (it - r * n_cb) * BLOCK_K + offs_c  # position in the run
            mask_c = jj < S * Cg
            s_of = jj // Cg
            cc = jj - s_of * Cg  # the channel (for the prologue's vectors)
            hh = h0 + r * DIL_H
            ww = w0[:, None] + s_of[None, :]
            valid_m = mask_m & (hh >= 0) & (hh < H)
            a_mask = valid_m[:, None] & mask_c[None, :] & (ww >= 0) & (ww < W)
            row = ((n_img * H + hh) * W + w0) * C  # the run's first element (masked where w < 0)
            a = tl.load(x_ptr + row[:, None] + jj[None, :], mask=a_mask, other=0.0)
            w_tap = w_ptr + (r * S * Cg).to(tl.int64) * Kg
            b_rows = jj
        else:
            tap = it // n_cb
            c0 = (it - tap * n_cb) * BLOCK_K
            r = tap // S
            s = tap - r * S
            if IS_GEMM:
                valid_m = mask_m
                row = m64 * C
            else:
                hh = h0 + r * DIL_H
                ww = w0 + s * DIL_W
                valid_m = mask_m & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                row = ((n_img * H + hh) * W + ww) * C + g * Cg
            w_tap = w_ptr + ((g * R + r) * S + s).to(tl.int64) * Cg * Kg
            cc = c0 + offs_c
            mask_c = cc < Cg
            a_mask = valid_m[:, None] & mask_c[None, :]
            a = tl.load(x_ptr + row[:, None] + cc[None, :], mask=a_mask, other=0.0)
            b_rows = cc
        if PROLOGUE:
            af = a.to(tl.float32)
            if HAS_IN_SCALE:
                isc = tl.load(in_scale_ptr + g * Cg + cc, mask=mask_c, other=1.0)
                af = af * isc[None, :]
            if HAS_IN_SHIFT:
                ish = tl.load(in_shift_ptr + g * Cg + cc, mask=mask_c, other=0.0)
                af = af + ish[None, :]
            if IN_RELU:
                af = tl.maximum(af, 0.0)
            # Padding (and out-of-range rows/channels) is zero *after* the transform.
            af = tl.where(a_mask, af, 0.0)
            a = af.to(x_ptr.dtype.element_ty)
        b = tl.load(w_tap + b_rows[:, None] * Kg + offs_n[None, :],
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out_offs = m64[:, None] * K + k_glob[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        # Split-K: this program's partial sum, float32, into its slice of the workspace; the
        # epilogue runs in splitk_epilogue_kernel once every split has written.
        tl.store(ws_ptr + sk.to(tl.int64) * M * K + out_offs, acc, mask=out_mask)
    else:
        _epilogue(acc, out_offs, out_mask, mask_m, k_glob, mask_n, pid_m * (BLOCK_M // STAT_ROWS),
                  out_ptr, scale_ptr, shift_ptr, res_ptr, pmean_ptr, plo_ptr, pm2_ptr, M, K,
                  STATS, HAS_RES, RELU, STAT_ROWS, BLOCK_M, BLOCK_N)


@triton.jit
def splitk_epilogue_kernel(
    ws_ptr,  # (SPLIT_K, M, K) float32 partial sums written by conv_kernel
    out_ptr, scale_ptr, shift_ptr, res_ptr, pmean_ptr, plo_ptr, pm2_ptr,  # as conv_kernel's
    M, K,
    SPLIT_K: tl.constexpr, STATS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    STAT_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split-K's second launch: sum the SPLIT_K partials of each output element in split order
    (fixed, so the result does not depend on which program finished first) and run the same
    fused epilogue as the unsplit kernel."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    k_glob = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = k_glob < K
    out_offs = offs_m.to(tl.int64)[:, None] * K + k_glob[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.load(ws_ptr + out_offs, mask=out_mask, other=0.0)
    for sk in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + tl.full([], sk, tl.int64) * M * K + out_offs, mask=out_mask, other=0.0)
    _epilogue(acc, out_offs, out_mask, mask_m, k_glob, mask_n, pid_m * (BLOCK_M // STAT_ROWS),
              out_ptr, scale_ptr, shift_ptr, res_ptr, pmean_ptr, plo_ptr, pm2_ptr, M, K,
              STATS, HAS_RES, RELU, STAT_ROWS, BLOCK_M, BLOCK_N)


@triton.jit
def stats_reduce_kernel(
    pmean_ptr, plo_ptr, pm2_ptr,  # (n_slots, K) float32 partials: block mean = hi + lo, block M2
    stats_ptr,  # (2, K) float32 out: (mean, M2)
    M, K, n_slots,
    STAT_ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Merge the per-16-row partials of each channel in slot order (Chan's parallel formula).

    Means are merged as offsets from a per-channel pivot (the first block's ``hi``):
    ``hi_i - pivot`` is exact when the means are close (Sterbenz), and ``+ lo_i`` restores the
    digits ``hi_i`` lost, so the between-block term of M2 stays accurate when |mean| >> std.
    """
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    pivot = tl.load(pmean_ptr + offs_k, mask=mask_k, other=0.0)
    n_a = tl.zeros((BLOCK_K,), dtype=tl.float32)
    mean_a = tl.zeros((BLOCK_K,), dtype=tl.float32)  # offset from the pivot
    m2_a = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for s0 in range(0, n_slots, BLOCK_S):
        slot = s0 + tl.arange(0, BLOCK_S)
        mask_s = slot < n_slots
        cnt = tl.minimum(M - slot * STAT_ROWS, STAT_ROWS).to(tl.float32)
        cnt = tl.where(mask_s, cnt, 0.0)
        offs = slot.to(tl.int64)[:, None] * K + offs_k[None, :]
        msk = mask_s[:, None] & mask_k[None, :]
        hi = tl.load(pmean_ptr + offs, mask=msk, other=0.0)
        lo = tl.load(plo_ptr + offs, mask=msk, other=0.0)
        pv = tl.load(pm2_ptr + offs, mask=msk, other=0.0)
        pm = tl.where(msk, (hi - pivot[None, :]) + lo, 0.0)
        n_b = tl.sum(cnt, axis=0)  # scalar: every channel has the same count
        mean_b = tl.sum(pm * cnt[:, None], axis=0) / n_b
        d = tl.where(msk, pm - mean_b[None, :], 0.0)
        m2_b = tl.sum(pv, axis=0) + tl.sum(d * d * cnt[:, None], axis=0)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    tl.store(stats_ptr + offs_k, pivot + mean_a, mask=mask_k)
    tl.store(stats_ptr + K + offs_k, m2_a, mask=mask_k)


# ----------------------------------------------------------------------------- launchers


def out_hw(h, w, r, s, stride, padding, dilation):
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def _input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 uses TF32 tensor cores only when
    ``torch.backends.cudnn.allow_tf32`` allows it (read per call, as cuDNN does), else IEEE float32.
    16-bit inputs ignore the setting (their MMA is exact products, float32 accumulation); they
    get triton's default ("tf32"), the value every 16-bit Triton GEMM is compiled with."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "tf32"


def launch_conv(x, weight, stride, padding, dilation, groups, *, in_scale=None, in_shift=None, in_relu=False,
                scale=None, shift=None, residual=None, relu=False, stats=False):
    """Run the conv kernel; returns ``out`` (conv_bn_act) or ``(z, stats)`` (``stats=True``).

    x: (N, C, H, W) any strides (read once into channels_last if needed); weight (K, Cg, R, S)
    like x; vectors float32; residual like the output. Arguments are validated by the caller.
    """
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    p, q = out_hw(h, w, r, s, stride, padding, dilation)
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)
    wp = packed_weight(weight, groups)  # cached while the weight is unchanged (see _pack)
    out = torch.empty((n, k, p, q), dtype=x.dtype, device=x.device, memory_format=cl)
    m = n * p * q
    kg = k // groups
    n_slots = triton.cdiv(m, STAT_ROWS)
    if stats:
        pmean, plo, pm2 = torch.empty((3, max(n_slots, 1), k), dtype=torch.float32, device=x.device).unbind(0)
    else:
        pmean = plo = pm2 = out  # unused
    if residual is not None:
        residual = residual.contiguous(memory_format=cl)
    # Per-channel vectors are read with unit stride.
    scale, shift, in_scale, in_shift = (
        None if v is None else v.contiguous() for v in (scale, shift, in_scale, in_shift))
    prologue = in_scale is not None or in_shift is not None or bool(in_relu)
    is_gemm = (r == 1 and s == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and groups == 1)
    pack_s = _tuning.packs_taps(cg, s, groups, dilation[1])
    dummy = out
    if m > 0 and k > 0:
        split = _split_k(x, m, kg, groups, r, s, cg, pack_s)
        ws = torch.empty((split, m, k), dtype=torch.float32, device=x.device) if split > 1 else dummy
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(kg, meta["BLOCK_N"]), groups * split)  # noqa: E731
        launch(conv_kernel, grid,
            x, wp, out,
            dummy if scale is None else scale, dummy if shift is None else shift,
            dummy if residual is None else residual,
            dummy if in_scale is None else in_scale, dummy if in_shift is None else in_shift,
            pmean, plo, pm2, ws,
            h, w, c, p, q, k, m, cg, kg,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            groups, R=r, S=s,
            PROLOGUE=prologue, HAS_IN_SCALE=in_scale is not None, HAS_IN_SHIFT=in_shift is not None,
            IN_RELU=bool(in_relu), STATS=bool(stats), HAS_RES=residual is not None, RELU=bool(relu),
            IS_GEMM=is_gemm, PACK_S=pack_s, INPUT_PRECISION=_input_precision(x.dtype), SPLIT_K=split,
            STAT_ROWS=STAT_ROWS,
        )
        if split > 1:
            bm = bn = 16 if interpret_mode() else 64
            launch(splitk_epilogue_kernel, (triton.cdiv(m, bm), triton.cdiv(k, bn)),
                ws, out, dummy if scale is None else scale, dummy if shift is None else shift,
                dummy if residual is None else residual, pmean, plo, pm2, m, k,
                SPLIT_K=split, STATS=bool(stats), HAS_RES=residual is not None, RELU=bool(relu),
                STAT_ROWS=STAT_ROWS, BLOCK_M=bm, BLOCK_N=bn,
            )
    if not stats:
        return out
    st = torch.empty((2, k), dtype=torch.float32, device=x.device)
    if m == 0:
        # As the reference: the mean of no values is NaN, their M2 is 0.
        st[0].fill_(float("nan"))
        st[1].zero_()
    elif k > 0:
        block_k = 16 if interpret_mode() else 64
        block_s = 16 if interpret_mode() else 64
        launch(stats_reduce_kernel, (triton.cdiv(k, block_k),),
            pmean, plo, pm2, st, m, k, n_slots, STAT_ROWS=STAT_ROWS, BLOCK_S=block_s, BLOCK_K=block_k,
        )
    return out, st
