"""Fused modules: drop-in ResNet blocks whose conv + BN (+ shortcut-add) (+ ReLU) run as fused ops.

What exists (the contract ``fused_resnet.convert`` builds on):

* :class:`BasicBlock`, :class:`Bottleneck` -- subclasses of torchvision's blocks with the same
  constructor ``(inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
  dilation=1, norm_layer=None)`` plus ``backend=None``, the same ``expansion`` and submodule names
  (``conv1, bn1, relu, conv2, bn2, [conv3, bn3,] downsample``), so state_dict keys are
  torchvision's. Because they subclass torchvision's classes, ``isinstance(m,
  torchvision.models.resnet.BasicBlock)`` is True for them too: test ``isinstance(m,
  fused_resnet.nn.BasicBlock)`` first to recognise an already-fused block.
* ``BasicBlock.from_module(block, backend=None)`` / ``Bottleneck.from_module(block, backend=None)``
  -- ADOPT a torchvision or timm block's submodules (the very same objects; weights shared, keys
  unchanged; ``stride`` read from conv1 / conv2; train/eval mode kept). timm's ``act1/act2/act3``
  must be ``nn.ReLU``; ``drop_block``/``aa``/``se``/``drop_path`` must be None or ``nn.Identity``.
  Raises ``ValueError`` with the reason when the block cannot be fused.
* ``downsample``: any module or None. An ``nn.Sequential`` ending in (``Conv2d``,
  ``BatchNorm2d``/``FrozenBatchNorm2d``) is fused (modules before the pair, e.g. timm's avg-down
  ``AvgPool2d``, run first as they are); any other module runs as given and its output is added
  as a plain residual (:func:`split_downsample` tells which).
* :class:`ConvBNAct` ``(in_channels, out_channels, kernel_size=3, stride=1, padding=None, groups=1,
  norm_layer=None, relu=True, dilation=1, bias=False, backend=None)`` with submodules ``conv`` and
  ``bn``; ``ConvBNAct.from_modules(conv, bn, relu=True, backend=None)`` adopts a stem's modules.
* :func:`convert_sync_batchnorm` -- BatchNorm2d -> SyncBatchNorm, which fused blocks run fused
  with statistics merged across processes.
* :class:`PlainBasicBlock` -- a BasicBlock without a shortcut (the CIFAR plain networks).
* :class:`Stage` -- an ``nn.Sequential`` of fused blocks whose eval plans may write each block's
  output into its (dead) input; the models' ``layer1..4`` are Stages, and ``fuse`` makes them.
* Every fused module has a ``backend`` attribute (None = auto) passed to the functional ops, and
  ``unfused_reason()`` (None, or why it runs as plain PyTorch: a norm layer that is not
  BatchNorm2d/FrozenBatchNorm2d, e.g. GroupNorm -> unfused with a ``FallbackWarning``).

Modes, per conv + norm unit (decided from the norm layer, as ``nn.BatchNorm2d`` decides):
running statistics (eval, or ``FrozenBatchNorm2d``) -> BN folded, ONE ``conv_bn_act`` per unit,
scale/shift cached and recomputed when any of their inputs changes; batch statistics (train, or
``track_running_stats=False``) -> ``conv_stats`` / ``bn_finalize`` with the BN + ReLU carried into
the next conv's prologue and the block ending in ``bn_add_act`` (projection BN applied on the fly).
"""

from .modules import BasicBlock, Bottleneck, ConvBNAct, PlainBasicBlock, Stage, split_downsample
from .sync import convert_sync_batchnorm

__all__ = ["ConvBNAct", "BasicBlock", "Bottleneck", "PlainBasicBlock", "Stage", "split_downsample",
           "convert_sync_batchnorm"]
