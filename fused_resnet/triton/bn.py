"""Per-channel BatchNorm kernels of the Triton backend, and their launchers.

Activations are viewed as a ``(M, K)`` row-major matrix: a contiguous channels_last
``(N, K, H, W)`` tensor is exactly that with ``M = N * H * W`` (inputs in other layouts are
copied once into channels_last). Per-channel vectors are float32; math is float32 and each
activation result is rounded once to its dtype.

* ``bn_finalize`` / ``bn_update_running_stats``: one program per block of channels.
  Running statistics are updated by their own (untuned) kernel, never inside a tuned one.
* ``bn_add_act``: elementwise, ``relu?(z * scale + shift + (residual * res_scale + res_shift |
  residual))``, the projection shortcut's BN applied on the fly ("dual BN").
* ``bn_add_act_backward``: ONE pass over the tile computes the ReLU mask (recomputing the
  pre-activation), writes ``grad_z`` and ``grad_residual`` and the per-tile partial sums of
  ``g``, ``g * z`` and ``g * residual``; a tiny second kernel adds the partials in a fixed
  order (deterministic, no atomics).
* ``stats_backward``: elementwise ``grad_z + grad_stats[0] / count + 2 * grad_stats[1] * (z - mean)``.

Block sizes are fixed (these kernels are memory-bound and simple; no tuning, so nothing can be
applied twice); under the interpreter they are small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpret_mode
from ._launch import launch

_CL = torch.channels_last


def _blocks():
    """(BLOCK_M, BLOCK_K) of the elementwise kernels."""
    return (16, 16) if interpret_mode() else (64, 64)


def _rsqrt(v):
    return 1.0 / tl.sqrt(v)


@triton.jit
def bn_finalize_kernel(
    stats_ptr,  # (2, K) float32 (mean, M2)
    gamma_ptr, beta_ptr,  # (K,) float32, optional
    scale_ptr, shift_ptr, mean_ptr, invstd_ptr,  # (K,) float32 outputs
    K, count, eps,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    mean = tl.load(stats_ptr + offs, mask=mask, other=0.0)
    m2 = tl.load(stats_ptr + K + offs, mask=mask, other=0.0)
    invstd = 1.0 / tl.sqrt(m2 / count + eps)
    scale = invstd
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + offs, mask=mask, other=1.0) * invstd
    shift = -mean * scale
    if HAS_BETA:
        shift = tl.load(beta_ptr + offs, mask=mask, other=0.0) - mean * scale
    tl.store(scale_ptr + offs, scale, mask=mask)
    tl.store(shift_ptr + offs, shift, mask=mask)
    tl.store(mean_ptr + offs, mean, mask=mask)
    tl.store(invstd_ptr + offs, invstd, mask=mask)


@triton.jit
def bn_update_running_stats_kernel(
    stats_ptr,  # (2, K) float32
    rmean_ptr, rvar_ptr,  # (K,) any float dtype, any stride, updated in place
    nbt_ptr,  # (1,) int64, incremented in place (HAS_NBT)
    K, count, momentum, rm_stride, rv_stride,
    HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    factor = momentum
    if HAS_NBT:
        nbt = tl.load(nbt_ptr) + 1
        if pid == 0:
            tl.store(nbt_ptr, nbt)
        if CUMULATIVE:
            factor = 1.0 / nbt.to(tl.float32)
    mean = tl.load(stats_ptr + offs, mask=mask, other=0.0)
    m2 = tl.load(stats_ptr + K + offs, mask=mask, other=0.0)
    unbiased = m2 / tl.maximum(count - 1, 1)
    rm = tl.load(rmean_ptr + offs * rm_stride, mask=mask, other=0.0)
    rv = tl.load(rvar_ptr + offs * rv_stride, mask=mask, other=0.0)
    new_rm = rm.to(tl.float32) * (1.0 - factor) + mean * factor
    new_rv = rv.to(tl.float32) * (1.0 - factor) + unbiased * factor
    tl.store(rmean_ptr + offs * rm_stride, new_rm.to(rmean_ptr.dtype.element_ty), mask=mask)
    tl.store(rvar_ptr + offs * rv_stride, new_rv.to(rvar_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_add_act_kernel(
    z_ptr, scale_ptr, shift_ptr, res_ptr, rscale_ptr, rshift_ptr, out_ptr,
    M, K,
    HAS_RES: tl.constexpr, HAS_RSCALE: tl.constexpr, HAS_RSHIFT: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = (offs_m < M)[:, None] & mask_k[None, :]
    offs = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    sc = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
    sh = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
    y = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sc[None, :] + sh[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RSCALE:
            r = r * tl.load(rscale_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
        if HAS_RSHIFT:
            r = r + tl.load(rshift_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
        y = y + r
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_add_act_backward_kernel(
    gout_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr, rscale_ptr, rshift_ptr,
    gz_ptr, gres_ptr,  # activation gradients out
    psum_g_ptr, psum_gz_ptr, psum_gr_ptr,  # (cdiv(M, BLOCK_M), K) float32 partial sums out
    M, K,
    HAS_RES: tl.constexpr, HAS_RSCALE: tl.constexpr, HAS_RSHIFT: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = (offs_m < M)[:, None] & mask_k[None, :]
    offs = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    sc = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RSCALE:
        rsc = tl.load(rscale_ptr + offs_k, mask=mask_k, other=0.0)
    if RELU:
        sh = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
        pre = z * sc[None, :] + sh[None, :]
        if HAS_RES:
            rr = r
            if HAS_RSCALE:
                rr = rr * rsc[None, :]
            if HAS_RSHIFT:
                rr = rr + tl.load(rshift_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
            pre = pre + rr
        g = tl.where(pre > 0, g, 0.0)
    g = tl.where(mask, g, 0.0)
    tl.store(gz_ptr + offs, (g * sc[None, :]).to(gz_ptr.dtype.element_ty), mask=mask)
    p_offs = pid_m.to(tl.int64) * K + offs_k
    tl.store(psum_g_ptr + p_offs, tl.sum(g, axis=0), mask=mask_k)
    tl.store(psum_gz_ptr + p_offs, tl.sum(g * z, axis=0), mask=mask_k)
    if HAS_RES:
        gr = g
        if HAS_RSCALE:
            gr = g * rsc[None, :]
            tl.store(psum_gr_ptr + p_offs, tl.sum(g * r, axis=0), mask=mask_k)
        tl.store(gres_ptr + offs, gr.to(gres_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sum_rows_kernel(
    part_ptr,  # (T, K) float32 partials
    out_ptr,  # (K,) float32
    T, K,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[k] = sum_t part[t, k], in a fixed order (deterministic)."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        msk = (t < T)[:, None] & mask_k[None, :]
        acc += tl.load(part_ptr + t.to(tl.int64)[:, None] * K + offs_k[None, :], mask=msk, other=0.0)
    tl.store(out_ptr + offs_k, tl.sum(acc, axis=0), mask=mask_k)


@triton.jit
def stats_backward_kernel(
    gz_ptr, gstats_ptr, z_ptr, stats_ptr, out_ptr,
    M, K, inv_count,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = (offs_m < M)[:, None] & mask_k[None, :]
    offs = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    g_mean = tl.load(gstats_ptr + offs_k, mask=mask_k, other=0.0)
    g_m2 = tl.load(gstats_ptr + K + offs_k, mask=mask_k, other=0.0)
    mean = tl.load(stats_ptr + offs_k, mask=mask_k, other=0.0)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = gz + (g_mean * inv_count)[None, :] + 2.0 * g_m2[None, :] * (z - mean[None, :])
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _mk(t: torch.Tensor):
    """(N, K, H, W) -> channels_last-contiguous tensor and (M, K)."""
    t = t.contiguous(memory_format=_CL)
    n, k, h, w = t.shape
    return t, n * h * w, k


def _c(*vs):
    """Per-channel vectors with unit stride (the kernels index them as ``ptr + k``)."""
    return tuple(None if v is None else v.contiguous() for v in vs)


def _vec_block():
    return 16 if interpret_mode() else 256


def bn_finalize(stats, count, gamma, beta, eps):
    k = stats.shape[1]
    stats = stats.contiguous()
    outs = [torch.empty(k, dtype=stats.dtype, device=stats.device) for _ in range(4)]
    if k:
        blk = _vec_block()
        launch(bn_finalize_kernel, (triton.cdiv(k, blk),),
            stats, stats if gamma is None else gamma.contiguous(), stats if beta is None else beta.contiguous(),
            *outs, k, count, eps, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, BLOCK=blk,
        )
    return tuple(outs)


def bn_update_running_stats(stats, count, running_mean, running_var, num_batches_tracked, momentum):
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    k = stats.shape[1]
    blk = max(_vec_block(), triton.next_power_of_2(max(k, 1)))  # one program: nbt incremented once
    launch(bn_update_running_stats_kernel, (triton.cdiv(max(k, 1), blk),),
        stats.contiguous(), running_mean, running_var,
        running_mean if num_batches_tracked is None else num_batches_tracked,
        k, count, 0.0 if momentum is None else float(momentum), running_mean.stride(0), running_var.stride(0),
        HAS_NBT=num_batches_tracked is not None, CUMULATIVE=momentum is None, BLOCK=blk,
    )


def bn_add_act(z, scale, shift, residual, res_scale, res_shift, relu):
    z, m, k = _mk(z)
    scale, shift, res_scale, res_shift = _c(scale, shift, res_scale, res_shift)
    out = torch.empty_like(z, memory_format=_CL)
    if residual is not None:
        residual = residual.contiguous(memory_format=_CL)
    if m and k:
        bm, bk = _blocks()
        launch(bn_add_act_kernel, (triton.cdiv(m, bm), triton.cdiv(k, bk)),
            z, scale, shift, z if residual is None else residual,
            scale if res_scale is None else res_scale, scale if res_shift is None else res_shift, out,
            m, k, HAS_RES=residual is not None, HAS_RSCALE=res_scale is not None,
            HAS_RSHIFT=res_shift is not None, RELU=bool(relu), BLOCK_M=bm, BLOCK_K=bk,
        )
    return out


def _sum_rows(part, k):
    out = torch.empty(k, dtype=torch.float32, device=part.device)
    bt, bk = (16, 16) if interpret_mode() else (32, 64)
    launch(sum_rows_kernel, (triton.cdiv(k, bk),), part, out, part.shape[0], k, BLOCK_T=bt, BLOCK_K=bk)
    return out


def bn_add_act_backward(grad_out, z, scale, shift, residual, res_scale, res_shift, relu):
    z, m, k = _mk(z)
    scale, shift, res_scale, res_shift = _c(scale, shift, res_scale, res_shift)
    grad_out = grad_out.contiguous(memory_format=_CL)
    gz = torch.empty_like(z, memory_format=_CL)
    empty_vec = scale.new_empty(0)
    if residual is not None:
        residual = residual.contiguous(memory_format=_CL)
        gres = torch.empty_like(residual, memory_format=_CL)
    else:
        gres = z.new_empty(0)
    if m == 0 or k == 0:
        zeros = torch.zeros(k, dtype=torch.float32, device=z.device)
        gscale, gshift = zeros, zeros.clone()
        grs = zeros.clone() if (residual is not None and res_scale is not None) else empty_vec
        return gz, gscale, gshift, gres, grs
    bm, bk = _blocks()
    t = triton.cdiv(m, bm)
    parts = torch.empty((3, t, k), dtype=torch.float32, device=z.device)
    launch(bn_add_act_backward_kernel, (t, triton.cdiv(k, bk)),
        grad_out, z, scale, shift, z if residual is None else residual,
        scale if res_scale is None else res_scale, scale if res_shift is None else res_shift,
        gz, gz if residual is None else gres, parts[0], parts[1], parts[2],
        m, k, HAS_RES=residual is not None, HAS_RSCALE=res_scale is not None,
        HAS_RSHIFT=res_shift is not None, RELU=bool(relu), BLOCK_M=bm, BLOCK_K=bk,
    )
    gshift = _sum_rows(parts[0], k)
    gscale = _sum_rows(parts[1], k)
    grs = _sum_rows(parts[2], k) if (residual is not None and res_scale is not None) else empty_vec
    return gz, gscale, gshift, gres, grs


def stats_backward(grad_z, grad_stats, z, stats, count):
    z, m, k = _mk(z)
    grad_z = grad_z.contiguous(memory_format=_CL)
    out = torch.empty_like(z, memory_format=_CL)
    if m and k:
        bm, bk = _blocks()
        launch(stats_backward_kernel, (triton.cdiv(m, bm), triton.cdiv(k, bk)),
            grad_z, grad_stats.contiguous(), z, stats.contiguous(), out, m, k, 1.0 / max(count, 1),
            BLOCK_M=bm, BLOCK_K=bk,
        )
    return out
