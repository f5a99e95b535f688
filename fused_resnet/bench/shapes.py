"""Every convolution of a ResNet-family model, with its FLOP count and minimal byte count.

Shapes are read off the model itself (a forward pass on the ``meta`` device with hooks on every
``nn.Conv2d``), so they hold for any torchvision ResNet / ResNeXt / Wide ResNet at any batch and
input size, and no memory or time is spent on data.

Each conv gets its role in the fused block: the last conv of a residual block
(``conv2`` of a BasicBlock, ``conv3`` of a Bottleneck) carries the shortcut add and the ReLU;
a projection shortcut (``downsample.0``) has neither; every other conv ends in BN + ReLU.

Counting rules (the "count before you tune" floor):

* ``flops = 2 * N * K * P * Q * (C / groups) * R * S`` (multiply-adds of the convolution; the BN,
  add and ReLU epilogue is not counted).
* ``min_bytes`` = bytes the fused op must move at the least: read x, the weights and the
  residual once, write y once (activation dtype), plus the per-channel float32 scale/shift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ConvShape:
    """One convolution: x (n, c, h, w) -> y (n, k, p, q) with a (k, c/groups, r, s) weight."""

    name: str  # first module of the model with this shape, e.g. "layer2.0.conv2"
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: int
    padding: int
    dilation: int
    groups: int
    residual: bool  # the shortcut is added before the activation
    relu: bool
    count: int = 1  # how many convs of the model share this shape and role

    @property
    def out_hw(self) -> tuple[int, int]:
        p = (self.h + 2 * self.padding - self.dilation * (self.r - 1) - 1) // self.stride + 1
        q = (self.w + 2 * self.padding - self.dilation * (self.s - 1) - 1) // self.stride + 1
        return p, q

    @property
    def flops(self) -> int:
        p, q = self.out_hw
        return 2 * self.n * self.k * p * q * (self.c // self.groups) * self.r * self.s

    def min_bytes(self, elem_size: int) -> int:
        p, q = self.out_hw
        x = self.n * self.c * self.h * self.w
        y = self.n * self.k * p * q
        w = self.k * (self.c // self.groups) * self.r * self.s
        return elem_size * (x + w + y + (y if self.residual else 0)) + 2 * 4 * self.k

    @property
    def label(self) -> str:
        p, q = self.out_hw
        tail = "+res" if self.residual else ("" if self.relu else " no-relu")
        return (f"{self.c}->{self.k} {self.r}x{self.s}/{self.stride} {self.h}x{self.w}->{p}x{q}"
                + (f" g{self.groups}" if self.groups > 1 else "") + tail)

    def key(self) -> tuple:
        d = asdict(self)
        d.pop("name")
        d.pop("count")
        return tuple(d.values())

    def as_dict(self, elem_size: int) -> dict:
        d = asdict(self)
        d.update(label=self.label, out_hw=list(self.out_hw), flops=self.flops, min_bytes=self.min_bytes(elem_size))
        return d


def is_residual_block(m: nn.Module) -> bool:
    """A torchvision-style BasicBlock/Bottleneck: conv1/bn1/conv2/bn2 (+conv3/bn3) and downsample."""
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2")) and hasattr(m, "downsample")


def conv_roles(model: nn.Module) -> dict[str, tuple[bool, bool]]:
    """``{conv module name: (residual, relu)}`` for every Conv2d of ``model``."""
    roles: dict[str, tuple[bool, bool]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            roles.setdefault(name, (False, True))
        if is_residual_block(m):
            last = "conv3" if hasattr(m, "conv3") else "conv2"
            roles[f"{name}.{last}"] = (True, True)
            if isinstance(m.downsample, nn.Sequential) and len(m.downsample) and isinstance(
                    m.downsample[0], nn.Conv2d):
                roles[f"{name}.downsample.0"] = (False, False)
    return roles


def _pair0(v) -> int:
    return v[0] if isinstance(v, tuple) else int(v)


def module_inputs(model: nn.Module, batch: int, size: int, types: tuple[type, ...]) -> dict[str, tuple]:
    """Input shape of every submodule of the given types, from one forward on ``meta``."""
    meta = _meta_copy(model)
    shapes: dict[str, tuple] = {}
    hooks = []
    for name, m in meta.named_modules():
        if isinstance(m, types):
            def hook(mod, args, _name=name):
                shapes.setdefault(_name, tuple(args[0].shape))  # returns None: args unchanged

            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            meta(torch.empty(batch, 3, size, size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _meta_copy(model: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(model).to("meta")
    return m.eval()


def conv_shapes(model: nn.Module, batch: int, size: int, distinct: bool = True) -> list[ConvShape]:
    """Every convolution of ``model`` on a (batch, 3, size, size) input, in model order.

    With ``distinct`` (default) convolutions with the same shape and role are listed once, under
    the first one's name, with ``count`` = how many there are.
    """
    roles = conv_roles(model)
    inputs = module_inputs(model, batch, size, (nn.Conv2d,))
    convs = dict(model.named_modules())
    out: list[ConvShape] = []
    index: dict[tuple, int] = {}
    for name, (n, c, h, w) in inputs.items():
        m = convs[name]
        residual, relu = roles.get(name, (False, True))
        cs = ConvShape(name, n, c, h, w, m.out_channels, m.kernel_size[0], m.kernel_size[1], _pair0(m.stride),
                       _pair0(m.padding), _pair0(m.dilation), m.groups, residual, relu)
        if distinct and cs.key() in index:
            i = index[cs.key()]
            old = out[i]
            out[i] = ConvShape(**{**asdict(old), "count": old.count + 1})
            continue
        index[cs.key()] = len(out)
        out.append(cs)
    return out


def model_flops(model: nn.Module, batch: int, size: int) -> int:
    """Forward FLOPs of all convolutions plus the final Linear layers (2 per multiply-add)."""
    total = sum(s.flops * s.count for s in conv_shapes(model, batch, size, distinct=True))
    for name, shape in module_inputs(model, batch, size, (nn.Linear,)).items():
        lin = dict(model.named_modules())[name]
        total += 2 * shape[0] * lin.in_features * lin.out_features
    return total
