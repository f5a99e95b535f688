"""``convert_sync_batchnorm``: synchronized BatchNorm for fused models under data parallelism."""

from __future__ import annotations

from torch import nn


def _sync_like(bn: nn.BatchNorm2d, process_group) -> nn.SyncBatchNorm:
    """An ``nn.SyncBatchNorm`` over ``process_group`` adopting ``bn``'s very parameters, buffers,
    train/eval flag and hooks (the hook dicts are shared, so the user's handles keep working)."""
    sync = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    if hasattr(bn, "qconfig"):  # as torch's convert_sync_batchnorm
        sync.qconfig = bn.qconfig
    for name, value in vars(bn).items():
        if "hook" in name:
            sync.__dict__[name] = value
    return sync


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by an ``nn.SyncBatchNorm`` over ``process_group``.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, but safe for fused models: the new module
    adopts the very same parameters and buffers (so optimizers built before keep working), keeps
    the train/eval flag and the hooks. Fused blocks run ``SyncBatchNorm`` through the fused ops,
    merging the batch statistics of all ranks between ``conv_stats`` and ``bn_finalize``
    (:func:`fused_resnet.distributed.sync_stats`); in eval it folds like a BatchNorm2d. Without an
    initialized process group (or with a group of one) a SyncBatchNorm is an ordinary BatchNorm.

    Works before or after :func:`fused_resnet.fuse`, and on :mod:`fused_resnet.models` models:

    * exact ``nn.BatchNorm2d`` -> ``nn.SyncBatchNorm`` (blocks adopted by ``fuse`` and fused_resnet
      blocks look their BNs up by name, so they use the new module at once);
    * the :class:`~fused_resnet.convert.FoldedBatchNorm2d` of a stem fused by ``fuse`` ->
      :class:`~fused_resnet.convert.FoldedSyncBatchNorm` (same parameters), and the stem's fused op
      is pointed at it; :func:`fused_resnet.unfuse` later gives a plain ``SyncBatchNorm`` back;
    * ``fuse`` of an already converted model fuses its ``SyncBatchNorm`` units too.

    Refused with ``ValueError``: any other BatchNorm2d subclass (it may compute something else;
    converting would drop that), and a ``FoldedBatchNorm2d`` passed without the model holding its
    fused conv (the conv must be re-pointed at the new module).

    Returns ``module`` (or its replacement when ``module`` itself is a BatchNorm2d); edits in place.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    from ..convert import _stem_bns

    return _convert(module, process_group, _stem_bns(module))


def _convert(module: nn.Module, process_group, stems: dict) -> nn.Module:
    from ..convert import FoldedBatchNorm2d, FoldedSyncBatchNorm, _rebind_stem_bn

    if isinstance(module, nn.BatchNorm2d):
        if type(module) is FoldedBatchNorm2d:
            conv = stems.get(id(module))
            if conv is None:
                raise ValueError("module: a FoldedBatchNorm2d (the BN of a stem fused by fused_resnet.fuse) can only "
                                 "be converted together with its FusedConv2d; pass the model that holds both")
            sync = _sync_like(module, process_group)
            object.__setattr__(sync, "__class__", FoldedSyncBatchNorm)
            _rebind_stem_bn(conv, sync, nn.SyncBatchNorm)
            return sync
        if type(module) is not nn.BatchNorm2d:
            raise ValueError(
                f"module: {type(module).__name__} is a BatchNorm2d subclass that convert_sync_batchnorm cannot "
                "synchronize without losing its behaviour; expected exact nn.BatchNorm2d modules (or the "
                "FoldedBatchNorm2d of a stem fused by fused_resnet.fuse)"
            )
        return _sync_like(module, process_group)
    for name, child in module.named_children():
        new = _convert(child, process_group, stems)
        if new is not child:
            setattr(module, name, new)
    return module
