"""Inputs, eager baselines and the design's 2x comparison rule shared by the GPU op suites
(``test_cuda_kernels.py``, ``test_triton_gpu.py``).

The rule: the error against the float64 reference may be at most 2x the error of PyTorch's own
eager computation in the same dtype (F.conv2d + BatchNorm math + add + relu, each rounded to that
dtype as an eager model would), plus a small floor scaled by the output's magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

CL = torch.channels_last
DEV = "cuda"
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def no_tf32_seeded():
    """float32 convs in full precision (cuDNN's TF32 default would dominate the error), fixed seed.

    Autouse in every module that imports it. (Not a tests/gpu/conftest.py: a second module named
    ``conftest`` would shadow tests/conftest.py for ``from conftest import ...``.)
    """
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Conv:
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1

    @property
    def args(self):
        s, p, d = self.stride, self.padding, self.dilation
        return [s, s], [p, p], [d, d], self.groups

    def out_hw(self):
        e = self.dilation * (self.r - 1) + 1
        return ((self.h + 2 * self.padding - e) // self.stride + 1,
                (self.w + 2 * self.padding - e) // self.stride + 1)

    def __str__(self):
        return (f"{self.n}x{self.c}x{self.h}x{self.w}-k{self.k}r{self.r}s{self.stride}"
                f"p{self.padding}d{self.dilation}g{self.groups}")


def rand(*shape, dtype, scale=1.0, offset=0.0, channels_last=True):
    t = (torch.randn(*shape, dtype=torch.float64, device=DEV) * scale + offset).to(dtype)
    return t.contiguous(memory_format=CL) if channels_last and t.dim() == 4 else t


def vec(k, dtype=torch.float32, positive=False):
    """A (k,) per-channel vector in the accumulation dtype of activations of ``dtype``."""
    v = torch.randn(k, dtype=torch.float64, device=DEV)
    if positive:
        v = v.abs() + 0.5
    return v.to(_acc(dtype))


def d64(t):
    return None if t is None else t.detach().to(torch.float64)


def conv_inputs(case: Conv, dtype):
    x = rand(case.n, case.c, case.h, case.w, dtype=dtype)
    fan_in = case.c // case.groups * case.r * case.r
    w = rand(case.k, case.c // case.groups, case.r, case.r, dtype=dtype, scale=(2.0 / fan_in) ** 0.5)
    return x, w


def assert_rule(actual, expected, dtype, eager=None, what="output"):
    """|actual - expected| <= 2 * |eager - expected| + floor, max over elements.

    expected: the float64 reference; eager: PyTorch's own computation in `dtype` (None when
    there is none worth comparing with: the floor alone then applies).
    """
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = d64(actual), d64(expected)
    if a.numel() == 0:
        return
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    mag = max(e.abs().max().item(), 1.0)
    err = (a - e).abs().max().item()
    own = 0.0 if eager is None else (d64(eager) - e).abs().max().item()
    bound = 2 * own + FLOOR[dtype] * mag
    assert err <= bound, (f"{what} [{dtype}]: error {err:.3e} > bound {bound:.3e} "
                          f"(eager error {own:.3e}, magnitude {mag:.3e})")


def assert_nhwc(t, what="output"):
    assert t.is_cuda, f"{what}: expected a CUDA tensor"
    assert t.is_contiguous(memory_format=CL), f"{what}: expected channels_last, strides {t.stride()}"


def bc(v):
    return v.view(1, -1, 1, 1)


# PyTorch's eager composition in the activation dtype: every layer's output rounded to it.
def eager_bn(t, scale, shift):
    return (t.to(_acc(t.dtype)) * bc(scale) + bc(shift)).to(t.dtype)


def eager_conv_bn_act(x, w, scale, shift, residual, case, relu):
    y = eager_bn(F.conv2d(x, w, None, *case.args), scale, shift)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def eager_prologue(x, in_scale, in_shift, in_relu):
    t = x
    if in_scale is not None or in_shift is not None:
        t = x.to(_acc(x.dtype))
        if in_scale is not None:
            t = t * bc(in_scale)
        if in_shift is not None:
            t = t + bc(in_shift)
        t = t.to(x.dtype)
    return torch.relu(t) if in_relu else t


def stats_of(z):
    """(2, K) per-channel (mean, M2) of z, computed in z's accumulation dtype."""
    z = z.to(_acc(z.dtype))
    mean = z.mean(dim=(0, 2, 3))
    return torch.stack([mean, ((z - bc(mean)) ** 2).sum(dim=(0, 2, 3))])
