"""Synchronized batch statistics for multi-process training (the fused ``nn.SyncBatchNorm``).

In training, a fused block computes per-channel statistics of each convolution output with
``conv_stats`` and turns them into BatchNorm's affine map with ``bn_finalize``. With data
parallelism, :func:`sync_stats` sits between the two: it merges every rank's ``(mean, M2,
count)`` into the statistics of the global batch, so each rank normalizes with the same mean and
variance, exactly as ``nn.SyncBatchNorm`` does.

Decisions:

* One ``all_gather`` of a ``(2, K)`` stats tensor per call (plus one of the int64 counts),
  merged with Chan's parallel formula in float64 -- exact for unequal per-rank batches (an empty
  rank contributes nothing) and accurate when ``|mean| >> std``.
* Differentiable: the gather is this module's own autograd function, whose backward all-reduces
  the gradient of the gathered ``(W, 2, K)`` statistics and keeps this rank's slot -- the
  all-reduce of ``sum(g)`` and ``sum(g * xhat)`` that ``nn.SyncBatchNorm``'s backward performs.
  Not ``torch.distributed.nn.functional.all_gather`` (deprecated in torch 2.14): its graph nodes
  hold the resolved ``ProcessGroup`` object, so a process that keeps an output tensor (and thus the
  graph) alive past ``destroy_process_group()`` tears gloo down during interpreter exit and aborts
  ("terminate called without an active exception", about 1 run in 5 on a 2-core machine).
  The function here stores the ``process_group`` argument as given (``None`` = the default group,
  looked up again in backward), so the graph keeps no group alive that the caller did not hold.
* The global count is needed as a Python int by ``bn_finalize`` (it also drives the unbiased
  running variance), so it is read back to the host: one device sync per BN layer, as
  ``nn.SyncBatchNorm`` has.
* Without an initialized process group, or with a group of one, statistics pass through.
* Deterministic: the gathered statistics are merged in rank order in float64 (no reduction whose
  order depends on timing), so every rank gets bitwise the same result, run after run.
* Device: whatever the process group's backend supports -- unlike ``nn.SyncBatchNorm``, which
  refuses CPU tensors, fused blocks synchronize CPU tensors over gloo too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["sync_stats", "is_active"]


def is_active(process_group=None) -> bool:
    """Whether :func:`sync_stats` would communicate (an initialized group of more than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


class _GatherStats(torch.autograd.Function):
    """``(2, K)`` stats of every rank stacked in rank order, ``(W, 2, K)``; differentiable.

    Backward: rank r's loss depends on every rank's copy of the gathered tensor, so the gradient
    of this rank's stats is the sum over ranks of their gradients at this rank's slot -- one
    all-reduce of the ``(W, 2, K)`` gradient, then this rank's row. Every rank must run backward
    (as with ``nn.SyncBatchNorm``).
    """

    @staticmethod
    def forward(ctx, stats: Tensor, process_group) -> Tensor:
        ctx.process_group = process_group  # the argument, not the resolved group: see the module doc
        stats = stats.contiguous()
        parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(parts, stats, group=process_group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd's buffer is not ours
        dist.all_reduce(grad, group=ctx.process_group)
        return grad[dist.get_rank(ctx.process_group)], None


def sync_stats(stats: Tensor, count: int, process_group=None) -> tuple[Tensor, int]:
    """Merge per-rank batch statistics into the global batch's.

    Args:
        stats: (2, K) per-channel (mean, M2) of this rank's values, float32 or float64 (as
            returned by :func:`fused_resnet.functional.conv_stats`).
        count: values per channel behind ``stats`` on this rank (``N * P * Q``; may be 0).
        process_group: the group to synchronize over (default: the world).

    Returns:
        ``(stats, count)`` of the union of all ranks' values: stats (2, K) in the input dtype,
        count the global int.
    """
    if not isinstance(stats, Tensor) or stats.dim() != 2 or stats.shape[0] != 2:
        raise ValueError(f"stats: expected a (2, K) tensor of (mean, M2), got {getattr(stats, 'shape', stats)!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count: expected a non-negative int, got {count!r}")
    if not is_active(process_group):
        return stats, count
    world = dist.get_world_size(process_group)
    counts = [torch.zeros(1, dtype=torch.int64, device=stats.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([count], dtype=torch.int64, device=stats.device), group=process_group)
    n_i = torch.cat(counts).to(torch.float64)  # (W,)
    total = int(n_i.sum().item())
    if total == 0:
        return stats, 0
    gathered = _GatherStats.apply(stats, process_group).to(torch.float64)  # (W, 2, K)
    weight = (n_i / total).view(-1, 1)
    # A rank with no values has undefined (mean, M2): it must not contribute, not even a NaN.
    present = (n_i > 0).view(-1, 1)
    means = torch.where(present, gathered[:, 0], 0.0)
    m2s = torch.where(present, gathered[:, 1], 0.0)
    mean = (weight * means).sum(0)
    m2 = m2s.sum(0) + (n_i.view(-1, 1) * (means - mean) ** 2).sum(0)
    return torch.stack([mean, m2]).to(stats.dtype), total
