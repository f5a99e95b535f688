"""ResNet / ResNeXt / Wide ResNet with fused blocks: torchvision's builders, keys and outputs.

:class:`ResNet` subclasses ``torchvision.models.ResNet`` and builds it from the fused
:class:`~fused_resnet.nn.BasicBlock` / :class:`~fused_resnet.nn.Bottleneck`, so the module tree and
state_dict keys are torchvision's (``load_state_dict`` works strictly in both directions) and
``zero_init_residual`` behaves the same. Only the forward differs: the input is converted once to
channels_last, the stem ``conv1/bn1/relu`` runs as one fused op (eval) or the training path, and
every block runs fused (see :mod:`fused_resnet.nn`). ``maxpool``, ``avgpool`` and ``fc`` are
PyTorch's own, except that an eval plan on the CPU may run conv1 + bn1 + relu + maxpool together in
oneDNN's blocked layout (:mod:`fused_resnet.nn._onednn_stem`).

Builders take torchvision's arguments: ``weights`` (see :func:`~fused_resnet.models._common.resolve_weights`:
a torchvision weights enum or its name -- loaded only from the local torch hub cache, never
downloaded --, a path, or a state_dict), ``progress`` (accepted for compatibility; nothing is
downloaded so nothing is shown) and ``**kwargs`` for :class:`ResNet` (``num_classes``,
``zero_init_residual``, ``groups``, ``width_per_group``, ``replace_stride_with_dilation``,
``norm_layer``, and ``backend``). With weights from an enum ``num_classes`` comes from its metadata;
with a path/state_dict it is read from ``fc.weight`` unless given.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, flatten
from torchvision.models import resnet as _tv

from .. import nn as fnn
from ._common import FusedModelMixin, load_strict, num_classes_of, resolve_weights, set_num_classes

__all__ = [
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

_FUSED = {_tv.BasicBlock: fnn.BasicBlock, _tv.Bottleneck: fnn.Bottleneck}


class ResNet(FusedModelMixin, _tv.ResNet):
    """torchvision's ``ResNet`` with fused blocks and stem.

    Args: as ``torchvision.models.ResNet`` (``block, layers, num_classes=1000,
    zero_init_residual=False, groups=1, width_per_group=64, replace_stride_with_dilation=None,
    norm_layer=None``) plus ``backend=None``. ``block`` may be a fused block class or
    torchvision's ``BasicBlock``/``Bottleneck`` (replaced by the fused one).

    Input: (N, 3, H, W) in any memory layout (converted once to channels_last); output
    (N, num_classes).
    """

    def __init__(self, block, layers: list[int], num_classes: int = 1000, zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64, replace_stride_with_dilation=None, norm_layer=None,
                 backend: str | None = None) -> None:
        block = _FUSED.get(block, block)
        if not (isinstance(block, type) and issubclass(block, (fnn.BasicBlock, fnn.Bottleneck))):
            raise TypeError(f"block: expected fused_resnet.nn.BasicBlock or Bottleneck (or torchvision's), "
                            f"got {block!r}")
        super().__init__(block, layers, num_classes, zero_init_residual, groups, width_per_group,
                         replace_stride_with_dilation, norm_layer)
        self._init_fused_model(backend)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self._fused_entry(x, self.maxpool)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = flatten(x, 1)
        return self.fc(x)


def _resnet(block, layers, enum_cls, weights, progress: bool, **kwargs: Any) -> ResNet:
    del progress  # nothing is downloaded
    state_dict, n_classes = resolve_weights(weights, enum_cls)
    if state_dict is not None:
        set_num_classes(kwargs, n_classes if n_classes is not None else num_classes_of(state_dict),
                        str(weights) if n_classes is not None else "fc.weight")
    model = ResNet(block, layers, **kwargs)
    if state_dict is not None:
        load_strict(model, state_dict)
    return model


def resnet18(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); weights: ``ResNet18_Weights`` or a path/state_dict."""
    return _resnet(fnn.BasicBlock, [2, 2, 2, 2], _tv.ResNet18_Weights, weights, progress, **kwargs)


def resnet34(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); weights: ``ResNet34_Weights`` or a path/state_dict."""
    return _resnet(fnn.BasicBlock, [3, 4, 6, 3], _tv.ResNet34_Weights, weights, progress, **kwargs)


def resnet50(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 V1.5 (Bottleneck, [3, 4, 6, 3]); weights: ``ResNet50_Weights`` or a path/state_dict."""
    return _resnet(fnn.Bottleneck, [3, 4, 6, 3], _tv.ResNet50_Weights, weights, progress, **kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]); weights: ``ResNet101_Weights`` or a path/state_dict."""
    return _resnet(fnn.Bottleneck, [3, 4, 23, 3], _tv.ResNet101_Weights, weights, progress, **kwargs)


def resnet152(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3]); weights: ``ResNet152_Weights`` or a path/state_dict."""
    return _resnet(fnn.Bottleneck, [3, 8, 36, 3], _tv.ResNet152_Weights, weights, progress, **kwargs)


def _set(kwargs: dict, name: str, value) -> None:
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"{name}: this architecture fixes {name}={value}, got {kwargs[name]}")
    kwargs[name] = value


def resnext50_32x4d(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (groups=32, width_per_group=4); weights: ``ResNeXt50_32X4D_Weights`` or a path/state_dict."""
    _set(kwargs, "groups", 32)
    _set(kwargs, "width_per_group", 4)
    return _resnet(fnn.Bottleneck, [3, 4, 6, 3], _tv.ResNeXt50_32X4D_Weights, weights, progress, **kwargs)


def resnext101_32x8d(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d; weights: ``ResNeXt101_32X8D_Weights`` or a path/state_dict."""
    _set(kwargs, "groups", 32)
    _set(kwargs, "width_per_group", 8)
    return _resnet(fnn.Bottleneck, [3, 4, 23, 3], _tv.ResNeXt101_32X8D_Weights, weights, progress, **kwargs)


def resnext101_64x4d(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d; weights: ``ResNeXt101_64X4D_Weights`` or a path/state_dict."""
    _set(kwargs, "groups", 64)
    _set(kwargs, "width_per_group", 4)
    return _resnet(fnn.Bottleneck, [3, 4, 23, 3], _tv.ResNeXt101_64X4D_Weights, weights, progress, **kwargs)


def wide_resnet50_2(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (width_per_group=128); weights: ``Wide_ResNet50_2_Weights`` or a path/state_dict."""
    _set(kwargs, "width_per_group", 128)
    return _resnet(fnn.Bottleneck, [3, 4, 6, 3], _tv.Wide_ResNet50_2_Weights, weights, progress, **kwargs)


def wide_resnet101_2(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2 (width_per_group=128); weights: ``Wide_ResNet101_2_Weights`` or a path/state_dict."""
    _set(kwargs, "width_per_group", 128)
    return _resnet(fnn.Bottleneck, [3, 4, 23, 3], _tv.Wide_ResNet101_2_Weights, weights, progress, **kwargs)
