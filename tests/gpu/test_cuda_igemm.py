"""The CUDA backend's own tensor-core convolution (csrc/cuda/igemm.cu), opted in with
``FUSED_RESNET_CUDA_CONV=igemm``, against the float64 reference.

conv_bn_act (BN scale/shift, residual, ReLU fused) and conv_stats (prologue, z, statistics
fused) through ``fused_resnet.functional`` with ``backend="cuda"``, at every distinct
ResNet-50 convolution shape except the stem (batch 2) and odd shapes (C = 8, K = 24, 5x7
spatial, stride 2 with odd H, dilation 2, batch 1 and 3), in float16 and bfloat16, by the
rule of gpu_common (error vs the float64 reference <= 2x PyTorch's own error in that dtype).
A profiler check proves the igemm kernel really ran (and that unsupported calls fall back to
cuDNN with the right answer); statistics are checked against the returned z itself, for
|mean| >> std, and for bitwise determinism; and the path is captured into a CUDA graph.

Needs a CUDA device of compute capability >= 8.0 and a build with the CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_common import (  # noqa: F401  (no_tf32_seeded: an autouse fixture)
    CL,
    DEV,
    Conv,
    assert_rule,
    capture,
    check_conv_bn_act,
    check_conv_stats,
    conv_inputs,
    d64,
    eager_conv_bn_act,
    rand,
    stats_of,
    vec,
)

try:
    import fused_resnet  # noqa: F401  (loads fused_resnet._C, which registers the kernels)
    from fused_resnet import functional as FR
    from fused_resnet import reference as ref
except Exception:  # pragma: no cover - keeps the module collectable while the package changes
    ref = None


def _usable() -> bool:
    if not torch.cuda.is_available() or ref is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("fused_resnet::conv_bn_act", "CUDA")
    except RuntimeError:
        return False


pytestmark = [
    pytest.mark.skipif(not _usable(), reason="needs CUDA and fused_resnet._C with CUDA kernels"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8,
                       reason="igemm needs compute capability >= 8.0 (mma.sync bf16, cp.async)"),
]

LOWP = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def igemm_on(monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_CUDA_CONV", "igemm")


def _rn50_shapes(n=2):
    """Every distinct ResNet-50 (torchvision v1.5: stride on the 3x3) conv but the stem."""
    out = []
    # (in spatial, inplanes, planes, blocks, stride) per stage
    for hw, inpl, planes, stride in [(56, 64, 64, 1), (56, 256, 128, 2), (28, 512, 256, 2),
                                     (14, 1024, 512, 2)]:
        exp = planes * 4
        o = hw // stride
        first_in = 64 if planes == 64 else inpl
        out += [
            Conv(n, first_in, hw, hw, planes, r=1, padding=0),             # block 1 reduce
            Conv(n, planes, hw, hw, planes, stride=stride),               # block 1 3x3 (s)
            Conv(n, planes, o, o, exp, r=1, padding=0),                   # expand
            Conv(n, first_in, hw, hw, exp, r=1, stride=stride, padding=0),  # projection
            Conv(n, exp, o, o, planes, r=1, padding=0),                   # later reduce
            Conv(n, planes, o, o, planes),                                # later 3x3
        ]
    seen, uniq = set(), []
    for c in out:
        if str(c) not in seen:
            seen.add(str(c))
            uniq.append(c)
    return uniq


RN50 = _rn50_shapes()
ODD = [
    Conv(3, 8, 5, 7, 24),                      # C = 8, K = 24, 5x7, batch 3
    Conv(1, 16, 9, 9, 8, stride=2),            # stride 2, odd H, batch 1, K = 8
    Conv(2, 24, 13, 11, 40, padding=2, dilation=2),  # dilation 2
    Conv(3, 32, 15, 15, 72, r=1, stride=2, padding=0),  # 1x1 s2, odd H, K not a tile multiple
    Conv(1, 64, 1, 1, 136, r=1, padding=0),   # H = W = 1, two N tiles
    Conv(2, 8, 31, 29, 16, r=7, stride=2, padding=3),  # 7x7 s2 on 8 channels (stem-like)
]
CASES = RN50 + ODD


def _kernels(fn):
    """Names of the CUDA kernels fn() launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


def _ran_igemm(fn) -> bool:
    return any("igemm_kernel" in n for n in _kernels(fn))


def test_shape_list_is_resnet50():
    assert len(RN50) == 22, [str(c) for c in RN50]


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)], ids=["res-relu", "plain"])
def test_conv_bn_act_igemm(case, dtype, residual, relu):
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype) if residual else None
    s, p, d, g = case.args
    y = FR.conv_bn_act(x, w, scale, shift, res, s, p, d, g, relu, backend="cuda")
    check_conv_bn_act(y, x, w, scale, shift, res, case, dtype, relu, f"igemm conv_bn_act {case}")


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn-relu"])
def test_conv_stats_igemm(case, dtype, prologue):
    x, w = conv_inputs(case, dtype)
    in_scale = vec(case.c, dtype, positive=True) if prologue else None
    in_shift = vec(case.c, dtype) if prologue else None
    s, p, d, g = case.args
    z, stats = FR.conv_stats(x, w, in_scale, in_shift, prologue, s, p, d, g, backend="cuda")
    check_conv_stats(z, stats, x, w, in_scale, in_shift, prologue, case, dtype,
                     f"igemm conv_stats {case} prologue={prologue}")


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_igemm_kernel_really_runs(dtype):
    """The opt-in reaches the kernel (else every test above would only test cuDNN)."""
    case = Conv(2, 64, 14, 14, 128)
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    s, p, d, g = case.args
    assert _ran_igemm(lambda: FR.conv_bn_act(x, w, scale, shift, None, s, p, d, g, True, backend="cuda"))
    assert _ran_igemm(lambda: FR.conv_stats(x, w, scale[:64], shift[:64], True, s, p, d, g,
                                            backend="cuda"))


def test_default_is_cudnn(monkeypatch):
    monkeypatch.delenv("FUSED_RESNET_CUDA_CONV")
    case = Conv(2, 64, 14, 14, 64)
    x, w = conv_inputs(case, torch.float16)
    scale, shift = vec(case.k, torch.float16, positive=True), vec(case.k, torch.float16)
    s, p, d, g = case.args
    assert not _ran_igemm(lambda: FR.conv_bn_act(x, w, scale, shift, None, s, p, d, g, True, backend="cuda"))


FALLBACK = [
    (Conv(2, 64, 14, 14, 64), torch.float32),           # float32: not an igemm dtype
    (Conv(2, 128, 14, 14, 128, groups=32), torch.bfloat16),  # grouped
    (Conv(2, 3, 32, 32, 64, r=7, stride=2, padding=3), torch.float16),  # C = 3
    (Conv(2, 64, 14, 14, 20), torch.float16),           # K % 8 != 0
]


@pytest.mark.filterwarnings("ignore:FUSED_RESNET_CUDA_CONV=igemm")
@pytest.mark.parametrize("case,dtype", FALLBACK, ids=lambda v: str(v))
def test_unsupported_falls_back_to_cudnn(case, dtype):
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype)
    s, p, d, g = case.args
    out = {}

    def run():
        out["y"] = FR.conv_bn_act(x, w, scale, shift, res, s, p, d, g, True, backend="cuda")
        out["zs"] = FR.conv_stats(x, w, None, None, False, s, p, d, g, backend="cuda")

    assert not _ran_igemm(run)
    expected = ref.conv_bn_act(d64(x), d64(w), d64(scale), d64(shift), d64(res), *case.args, relu=True)
    assert_rule(out["y"], expected, dtype, eager_conv_bn_act(x, w, scale, shift, res, case, True), "fallback y")
    ez, estats = ref.conv_stats(d64(x), d64(w), None, None, False, *case.args)
    eager_z = F.conv2d(x, w, None, s, p, d, g)
    assert_rule(out["zs"][0], ez, dtype, eager_z, "fallback z")
    assert_rule(out["zs"][1][1], estats[1], dtype, stats_of(eager_z)[1], "fallback M2")


@pytest.mark.parametrize("dtype,offset", [(torch.float16, 60.0), (torch.bfloat16, -60.0)], ids=str)
def test_conv_stats_large_mean(dtype, offset):
    """|mean| >> std: per-tile two-pass partials + Chan merge keep M2 accurate."""
    n, c, h, wd, k = 4, 64, 28, 28, 48
    x = rand(n, c, h, wd, dtype=dtype, scale=8.0, offset=offset)
    w = (torch.full((k, c, 1, 1), 1.0 / c, dtype=torch.float64, device=DEV)
         * (1 + 0.01 * torch.randn(k, 1, 1, 1, dtype=torch.float64, device=DEV))).to(dtype)
    w = w.contiguous(memory_format=CL)
    assert _ran_igemm(lambda: FR.conv_stats(x, w, backend="cuda"))
    z, stats = FR.conv_stats(x, w, backend="cuda")
    own = stats_of(d64(z))
    std = (own[1] / (n * h * wd)).sqrt()
    assert (std > 0).all() and (own[0].abs() > 10 * std).all(), "not a large-mean case"
    assert ((d64(stats[0]) - own[0]).abs() / own[0].abs()).max().item() <= 1e-6
    assert ((d64(stats[1]) - own[1]).abs() / own[1]).max().item() <= 3e-5


def test_deterministic():
    case = Conv(8, 64, 56, 56, 64)
    x, w = conv_inputs(case, torch.bfloat16)
    isc, ish = vec(case.c, torch.bfloat16, positive=True), vec(case.c, torch.bfloat16)
    s, p, d, g = case.args
    z1, s1 = FR.conv_stats(x, w, isc, ish, True, s, p, d, g, backend="cuda")
    z2, s2 = FR.conv_stats(x, w, isc, ish, True, s, p, d, g, backend="cuda")
    assert torch.equal(z1, z2) and torch.equal(s1, s2)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_cuda_graph_igemm(dtype):
    case = Conv(4, 64, 28, 28, 128)
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    isc, ish = vec(case.c, dtype, positive=True), vec(case.c, dtype)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype)
    s, p, d, g = case.args

    ops = torch.ops.fused_resnet  # the registered CUDA kernels, as the other graph tests

    def step():
        y = ops.conv_bn_act(x, w, scale, shift, res, s, p, d, g, True)
        z, st = ops.conv_stats(x, w, isc, ish, True, s, p, d, g)
        return y, z, st

    assert _ran_igemm(step)

    graph, (y, z, st) = capture(step)
    for _ in range(2):
        x.copy_(rand(*x.shape, dtype=dtype))
        res.copy_(rand(*res.shape, dtype=dtype))
        graph.replay()
        torch.cuda.synchronize()
        ey, ez, est = step()  # eager igemm: the same kernels, deterministic
        assert torch.equal(y, ey) and torch.equal(z, ez) and torch.equal(st, est)
        expected = ref.conv_bn_act(d64(x), d64(w), d64(scale), d64(shift), d64(res), *case.args, relu=True)
        assert_rule(y, expected, dtype, eager_conv_bn_act(x, w, scale, shift, res, case, True), "graph y")
