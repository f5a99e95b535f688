"""``convert_sync_batchnorm``: synchronized BatchNorm for fused models under data parallelism."""

from __future__ import annotations

from torch import nn


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by an ``nn.SyncBatchNorm`` over ``process_group``.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, but safe for fused models: the new module
    adopts the very same parameters and buffers (so optimizers built before keep working) and
    keeps the train/eval flag. Fused blocks run ``SyncBatchNorm`` through the fused ops, merging the
    batch statistics of all ranks between ``conv_stats`` and ``bn_finalize``
    (:func:`fused_resnet.distributed.sync_stats`); in eval it folds like a BatchNorm2d.

    Only exact ``nn.BatchNorm2d`` instances are converted. A BatchNorm2d subclass -- in particular
    the ``FoldedBatchNorm2d`` that :func:`fused_resnet.fuse` leaves in a fused stem -- raises a
    ``ValueError`` rather than being left unsynchronized. Models from :mod:`fused_resnet.models`
    convert directly; a model converted before ``fuse`` keeps correct synchronized BN, but ``fuse``
    leaves its SyncBatchNorm units unfused.

    Returns ``module`` (or its replacement when ``module`` itself is a BatchNorm2d); edits in place.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    if isinstance(module, nn.BatchNorm2d):
        if type(module) is not nn.BatchNorm2d:
            raise ValueError(
                f"module: {type(module).__name__} is a BatchNorm2d subclass that convert_sync_batchnorm cannot "
                "synchronize (a fused stem's folded BN?); use a fused_resnet.models model, or call "
                "convert_sync_batchnorm before fused_resnet.fuse (which then leaves SyncBatchNorm units unfused)"
            )
        sync = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
