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


def check_conv_bn_act(y, x, w, scale, shift, residual, case, dtype, relu, what):
    """A conv_bn_act result `y` (any backend) against the float64 reference by the 2x rule."""
    from fused_resnet import reference as ref

    assert_nhwc(y, what)
    assert y.dtype == dtype, f"{what}: dtype {y.dtype} != {dtype}"
    expected = ref.conv_bn_act(d64(x), d64(w), d64(scale), d64(shift), d64(residual), *case.args, relu=relu)
    assert_rule(y, expected, dtype, eager_conv_bn_act(x, w, scale, shift, residual, case, relu), what)


def check_conv_stats(z, stats, x, w, in_scale, in_shift, in_relu, case, dtype, what):
    """A conv_stats result (z, stats) against the float64 reference by the 2x rule, plus the
    statistics against float64 statistics of the returned z itself (the reduction alone)."""
    from fused_resnet import reference as ref

    assert_nhwc(z, what + " z")
    assert z.dtype == dtype and stats.dtype == torch.float32 and stats.shape == (2, case.k), (
        f"{what}: z {z.dtype}, stats {stats.dtype} {tuple(stats.shape)}")
    ez, estats = ref.conv_stats(d64(x), d64(w), d64(in_scale), d64(in_shift), in_relu, *case.args)
    eager_z = F.conv2d(eager_prologue(x, in_scale, in_shift, in_relu), w, None, *case.args)
    eager_s = stats_of(eager_z)
    assert_rule(z, ez, dtype, eager_z, what + " z")
    assert_rule(stats[0], estats[0], dtype, eager_s[0], what + " mean")
    assert_rule(stats[1], estats[1], dtype, eager_s[1], what + " M2")
    own = stats_of(d64(z))
    assert (d64(stats[0]) - own[0]).abs().max().item() <= 2e-6 * max(own[0].abs().max().item(), 1.0)
    m2_rel = ((d64(stats[1]) - own[1]).abs() / own[1].clamp_min(1e-30)).max().item()
    assert m2_rel <= 2e-5, f"{what}: M2 relative error {m2_rel:.3e}"


def capture(fn, warmup=1):
    """Warm up fn() on a side stream (as torch.cuda.graphs recommends: caches filled, Triton
    tuned, outside the capture), then capture one fn() into a CUDA graph; (graph, its output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
