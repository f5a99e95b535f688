"""The CIFAR-10 networks of He et al., "Deep Residual Learning for Image Recognition" (2015), sec. 4.2.

``6n + 2`` layers: a 3x3 stem conv with 16 channels, three stages of ``n`` BasicBlocks with 16, 32
and 64 channels (the first block of stages 2 and 3 has stride 2), global average pooling and a
fully connected layer. Depths 20, 32, 44, 56, 110, 1202 are ``n = 3, 5, 7, 9, 18, 200``.

Shortcut options (the paper's A/B/C, sec. 3.3 and table 3):

* ``"A"`` (the paper's CIFAR choice): identity shortcuts everywhere; where the shape changes the
  shortcut is parameter-free -- :class:`PadShortcut`: stride-2 subsampling (``x[:, :, ::2, ::2]``)
  and zero channels appended after the existing ones (decision: appended, not split on both
  sides; the two differ only by a permutation of the zero channels). It runs as the block's
  ``downsample`` and its output is added through the fused ops' residual input
  (``bn_add_act`` in training, ``conv_bn_act`` in eval).
* ``"B"``: 1x1 conv + BN projections only where the shape changes, identity elsewhere.
* ``"C"``: 1x1 conv + BN projections on every block.

Plain networks (no shortcuts at all, for the degradation experiment) are separate builders,
``cifar_plain20/32/44/56/110/1202`` (decision: named builders rather than a flag on the residual
ones, so a name says which experiment arm it is); :class:`CifarResNet` takes ``plain=True``.

State_dict keys follow torchvision's naming: ``conv1, bn1, layer1..3.<i>.{conv1,bn1,conv2,bn2,
downsample.0/1}, fc``. Initialisation: Kaiming-normal convs (fan_out, as torchvision), BN weight 1
and bias 0, ``zero_init_residual`` optional as in torchvision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as fnn
from ._common import FusedModelMixin, load_strict, num_classes_of, resolve_weights, set_num_classes

__all__ = ["CifarResNet", "PadShortcut", "cifar_resnet"]

_DEPTHS = (20, 32, 44, 56, 110, 1202)
_CL = torch.channels_last


class PadShortcut(nn.Module):
    """Option A's parameter-free shortcut: ``x[:, :, ::stride, ::stride]`` with
    ``out_channels - in_channels`` zero channels appended. (N, C, H, W) -> (N, K, ceil(H/s), ceil(W/s)),
    channels_last."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels: expected >= in_channels ({in_channels}), got {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        y = x[:, :, :: self.stride, :: self.stride]
        if self.out_channels > self.in_channels:
            y = F.pad(y, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))
        return y.contiguous(memory_format=_CL)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class CifarResNet(FusedModelMixin, nn.Module):
    """He et al.'s CIFAR ResNet / plain net with fused blocks.

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, 1202 in the paper; any ``6n + 2 >= 8`` is accepted).
        shortcut: ``"A"``, ``"B"`` or ``"C"`` (see the module docstring); ignored when ``plain``.
        plain: no shortcuts (:class:`~fused_resnet.nn.PlainBasicBlock`).
        num_classes: 10 for CIFAR-10.
        zero_init_residual: zero each block's last BN weight (residual nets only), as torchvision.
        norm_layer: default ``nn.BatchNorm2d``.
        backend: None (auto) or a backend name, for every fused module.

    Input: (N, 3, H, W) (32x32 for CIFAR), any layout (converted once to channels_last).
    """

    def __init__(self, depth: int = 20, shortcut: str = "A", plain: bool = False, num_classes: int = 10,
                 zero_init_residual: bool = False, norm_layer=None, backend: str | None = None) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth: expected 6n + 2 with n >= 1 (e.g. {', '.join(map(str, _DEPTHS))}), got {depth!r}")
        if not isinstance(shortcut, str) or shortcut.upper() not in ("A", "B", "C"):
            raise ValueError(f"shortcut: expected 'A', 'B' or 'C', got {shortcut!r}")
        self.depth, self.shortcut, self.plain = depth, shortcut.upper(), bool(plain)
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self._norm_layer = norm_layer
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, n, 1)
        self.layer2 = self._make_stage(32, n, 2)
        self.layer3 = self._make_stage(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual and not self.plain:
            for m in self.modules():
                if isinstance(m, fnn.BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)
        self._init_fused_model(backend)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            if self.plain:
                layers.append(fnn.PlainBasicBlock(self.inplanes, planes, s, norm_layer=self._norm_layer))
            else:
                changes = s != 1 or self.inplanes != planes
                downsample = None
                if self.shortcut == "C" or (self.shortcut == "B" and changes):
                    downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, s, bias=False),
                                               self._norm_layer(planes))
                elif self.shortcut == "A" and changes:
                    downsample = PadShortcut(self.inplanes, planes, s)
                layers.append(fnn.BasicBlock(self.inplanes, planes, s, downsample, norm_layer=self._norm_layer))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self._fused_entry(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))

    def extra_repr(self) -> str:
        kind = "plain" if self.plain else f"shortcut={self.shortcut!r}"
        return f"depth={self.depth}, {kind}, backend={self.backend!r}"


def cifar_resnet(depth: int, *, weights=None, plain: bool = False, shortcut: str = "A", **kwargs: Any) -> CifarResNet:
    """Build a :class:`CifarResNet`; ``weights``: None, a path or a state_dict (``num_classes`` read
    from ``fc.weight`` unless given), loaded strictly."""
    state_dict, _ = resolve_weights(weights)
    if state_dict is not None:
        set_num_classes(kwargs, num_classes_of(state_dict), "fc.weight")
    model = CifarResNet(depth, shortcut=shortcut, plain=plain, **kwargs)
    if state_dict is not None:
        load_strict(model, state_dict)
    return model


def _builder(depth: int, plain: bool):
    if plain:
        def build(*, weights=None, **kwargs: Any) -> CifarResNet:
            return cifar_resnet(depth, weights=weights, plain=True, **kwargs)

        build.__doc__ = f"Plain {depth}-layer CIFAR net (no shortcuts), He et al. 2015 sec. 4.2."
        build.__name__ = f"cifar_plain{depth}"
    else:
        def build(*, weights=None, shortcut: str = "A", **kwargs: Any) -> CifarResNet:
            return cifar_resnet(depth, weights=weights, shortcut=shortcut, **kwargs)

        build.__doc__ = f"ResNet-{depth} for CIFAR (n = {(depth - 2) // 6}), shortcut option 'A' (default), 'B' or 'C'."
        build.__name__ = f"cifar_resnet{depth}"
    build.__qualname__ = build.__name__
    return build


for _d in _DEPTHS:
    for _plain in (False, True):
        _b = _builder(_d, _plain)
        globals()[_b.__name__] = _b
        __all__.append(_b.__name__)
del _d, _plain, _b
