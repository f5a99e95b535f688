"""Shared test helpers: random op inputs (never zeros) and comparisons against the reference."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("FUSED_RESNET_QUIET", "1")

import fused_resnet  # noqa: E402
from fused_resnet import _ext, reference  # noqa: E402

CL = torch.channels_last

requires_c = pytest.mark.skipif(not _ext.available(), reason="fused_resnet._C not loaded (see `fused-resnet info`)")


@dataclass(frozen=True)
class ConvCase:
    """One convolution configuration: x (n, c, h, w), weight (k, c/groups, r, s)."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int = 3
    s: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1

    @property
    def conv_args(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def out_hw(self):
        p = (self.h + 2 * self.padding - self.dilation * (self.r - 1) - 1) // self.stride + 1
        q = (self.w + 2 * self.padding - self.dilation * (self.s - 1) - 1) // self.stride + 1
        return p, q

    def __str__(self):
        return (f"n{self.n}c{self.c}h{self.h}w{self.w}k{self.k}r{self.r}s{self.s}"
                f"st{self.stride}p{self.padding}d{self.dilation}g{self.groups}")


# Real ResNet layer shapes (batch kept small for the CPU) and odd ones.
RESNET_CASES = [
    ConvCase(2, 3, 32, 32, 64, 7, 7, stride=2, padding=3),  # stem (spatially reduced)
    ConvCase(2, 64, 14, 14, 64),  # BasicBlock 3x3
    ConvCase(2, 256, 8, 8, 64, 1, 1, padding=0),  # bottleneck reduce 1x1
    ConvCase(2, 128, 8, 8, 128, stride=2),  # stage-entry 3x3 s2
    ConvCase(2, 256, 8, 8, 512, 1, 1, stride=2, padding=0),  # projection shortcut 1x1 s2
    ConvCase(2, 128, 7, 7, 128, groups=32),  # ResNeXt 32x4d grouped 3x3
]
ODD_CASES = [
    ConvCase(1, 5, 7, 9, 7),  # batch 1, odd channels, non-square
    ConvCase(3, 3, 1, 1, 5, 1, 1, padding=0),  # H = W = 1
    ConvCase(2, 6, 5, 5, 9, padding=2, dilation=2),  # dilation
    ConvCase(2, 8, 6, 6, 8, groups=8),  # depthwise
    ConvCase(2, 12, 9, 7, 6, stride=2, padding=0, groups=3),  # stride 2, groups, no padding
    ConvCase(1, 33, 4, 4, 17, 3, 1, padding=1),  # 3x1 kernel, channels not a multiple of a tile
]
ALL_CASES = RESNET_CASES + ODD_CASES


def rand(*shape, dtype=torch.float32, device="cpu", channels_last=True, scale=1.0, offset=0.0):
    t = torch.randn(*shape, dtype=torch.float64, device=device) * scale + offset
    t = t.to(dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=CL)
    return t


def vec(k, like_dtype=torch.float32, device="cpu", positive=False):
    acc = reference.acc_dtype(like_dtype)
    v = torch.randn(k, dtype=torch.float64, device=device)
    if positive:
        v = v.abs() + 0.5
    return v.to(acc)


def conv_inputs(case: ConvCase, dtype=torch.float32, device="cpu", residual=False):
    """x, weight (He-scaled so outputs stay O(1)), scale, shift, residual-or-None."""
    x = rand(case.n, case.c, case.h, case.w, dtype=dtype, device=device)
    fan_in = case.c // case.groups * case.r * case.s
    w = rand(case.k, case.c // case.groups, case.r, case.s, dtype=dtype, device=device,
             scale=(2.0 / fan_in) ** 0.5)
    scale = vec(case.k, dtype, device, positive=True)
    shift = vec(case.k, dtype, device)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype, device=device) if residual else None
    return x, w, scale, shift, res


def f64(t):
    return None if t is None else t.detach().to(torch.float64)


def assert_matches(actual, expected, dtype, lowp_reference=None, what="output"):
    """Compare a backend result with the float64 reference.

    float64 and float32: tight tolerances scaled by the output's magnitude. float16/bfloat16:
    the design's rule -- error against the float64 reference at most 2x the error of the
    reference computed in that dtype (``lowp_reference``), plus a small absolute floor.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.numel() == 0:
        return
    mag = e.abs().max().item() + 1e-12
    err = (a - e).abs().max().item()
    if dtype == torch.float64:
        assert err <= 1e-9 * max(mag, 1.0), f"{what}: float64 error {err:.3e} (magnitude {mag:.3e})"
    elif dtype == torch.float32:
        assert err <= 2e-5 * max(mag, 1.0), f"{what}: float32 error {err:.3e} (magnitude {mag:.3e})"
    else:
        assert lowp_reference is not None, "low-precision comparisons need the reference in that dtype"
        own = (lowp_reference.detach().to(torch.float64) - e).abs().max().item()
        bound = 2 * own + 1e-3 * max(mag, 1.0)
        assert err <= bound, f"{what}: {dtype} error {err:.3e} > 2 x torch's own {own:.3e} (+floor)"


class OpRecorder(TorchDispatchMode):
    """``with OpRecorder() as rec:`` records every op that actually runs (below autograd) in
    ``rec.ops``, e.g. "fused_resnet.conv_bn_act", "aten.add"."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(".".join(str(func).split(".")[:2]))
        return func(*args, **(kwargs or {}))


def close(a, b, what, rtol=1e-9):
    """max|a - b| <= rtol * max(max|b|, 1), same shapes (compared in float64)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item()
    mag = max(b.abs().max().item(), 1.0)
    assert err <= rtol * mag, f"{what}: error {err:.3e} (magnitude {mag:.3e})"


def randomize_norms(module: torch.nn.Module, seed: int, running: bool = True) -> None:
    """Non-trivial affine parameters and running statistics (never the init's 1/0) in every
    BatchNorm2d / FrozenBatchNorm2d / GroupNorm of ``module``, from a generator seeded with ``seed``:
    weight U(0.5, 1.5), bias U(-0.5, 0.5), running_mean N(0, 0.3^2), running_var U(0.5, 1.5)."""
    from torchvision.ops import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d, torch.nn.GroupNorm)):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                if running and getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


__all__ = ["fused_resnet"]


def run_in_threads(work, n: int) -> list[str]:
    """Runs ``work(i)`` for ``i`` in ``range(n)`` in ``n`` threads at once; returns ``repr`` of every
    exception they raised (empty when all succeeded)."""
    errors: list[str] = []

    def guarded(i):
        try:
            work(i)
        except Exception as exc:  # noqa: BLE001 - collected for the caller's assert
            errors.append(repr(exc))

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def conv_config_strategy(*, groups=(1, 1, 1, 2, 3, 4), max_per_group=None, max_channels=None,
                         kernels=((1, 1), (3, 3), (7, 7)), max_stride=2, max_padding=2, max_dilation=2,
                         extra_hw=None, max_hw=None, max_n=3):
    """A hypothesis strategy of valid convolution configs for the property-based suites: dicts with
    ``n, c, h, w, k, r, s`` and ``stride, padding, dilation`` as (h, w) pairs, and ``groups``.

    ``groups`` is drawn from ``groups``; channels per group from 1 to ``max_per_group`` (or to
    ``max_channels // groups``); ``(r, s)`` from ``kernels``; each stride / padding / dilation
    component independently up to its maximum; the input is at least as large as gives a 1 x 1
    output, and at most ``extra_hw`` larger than that (or at most ``max_hw``). Each suite picks
    ranges its backend can afford (the Triton interpreter is slow: small sizes)."""
    from hypothesis import strategies as st

    @st.composite
    def configs(draw):
        g = draw(st.sampled_from(list(groups)))
        per_group = max_per_group if max_per_group is not None else max(1, max_channels // g)
        c = g * draw(st.integers(1, per_group))
        k = g * draw(st.integers(1, per_group))
        r, s = draw(st.sampled_from(list(kernels)))
        stride = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
        padding = (draw(st.integers(0, max_padding)), draw(st.integers(0, max_padding)))
        dilation = (draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation)))
        sizes = []
        for kk, p, d in ((r, padding[0], dilation[0]), (s, padding[1], dilation[1])):
            lo = max(1, d * (kk - 1) + 1 - 2 * p)  # the smallest input with a 1 x 1 output
            sizes.append(draw(st.integers(lo, lo + extra_hw if extra_hw is not None else max(lo, max_hw))))
        return dict(n=draw(st.integers(1, max_n)), c=c, h=sizes[0], w=sizes[1], k=k, r=r, s=s, stride=stride,
                    padding=padding, dilation=dilation, groups=g)

    return configs()


def conv_out_hw(cfg: dict) -> tuple[int, int]:
    """Output (P, Q) of a ``conv_config_strategy`` config."""
    return tuple((size + 2 * p - d * (kk - 1) - 1) // stp + 1 for size, p, d, kk, stp in
                 zip((cfg["h"], cfg["w"]), cfg["padding"], cfg["dilation"], (cfg["r"], cfg["s"]), cfg["stride"],
                     strict=True))


def spy_triton_launches(monkeypatch) -> list[tuple]:
    """Record every launch of the Triton backend's conv launcher as ``(kernel, kwargs)`` (the
    kernels still run). Imports triton: call it only where triton may be imported."""
    from fused_resnet.triton import conv

    launched: list[tuple] = []
    real = conv.launch

    def spy(kernel, grid, *args, **kwargs):
        launched.append((kernel, kwargs))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(conv, "launch", spy)
    return launched
