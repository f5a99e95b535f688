"""The CUDA backend's own tensor-core convolution (csrc/cuda/igemm.cu), opted in with
``FUSED_RESNET_CUDA_CONV=igemm``, against the float64 reference.

conv_bn_act (BN scale/shift, residual, ReLU fused) and conv_stats (prologue, z, statistics
fused) through ``fused_resnet.functional`` with ``backend="cuda"``, at every distinct
ResNet-50 convolution shape except the stem (batch 2) and odd shapes (C = 8, K = 24, 5x7
spatial, stride 2 with odd H, dilation 2, batch 1 and 3), in float16 and bfloat16, by the
rule of gpu_common (error vs the float64 reference <= 2x PyTorch's own error in that dtype).
Grouped convolutions (ResNeXt: resnext50_32x4d, resnext101_32x8d, resnext101_64x4d grouped 3x3
shapes, channels per group 8..64, and odd grouped shapes) by the same rule, each asserting that
igemm really ran; channels per group 4 falls back to cuDNN in 16-bit (and still agrees).
float32: with TF32 allowed for convolutions (torch.backends.cudnn.allow_tf32) igemm runs TF32
math and is checked against float64 by an error bound DERIVED from TF32 rounding (see
``tf32_conv_bound``); with it disallowed (the suite's default, gpu_common.no_tf32_seeded) float32
stays on cuDNN in exact float32 and is checked by the 2x rule.
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


def _run_igemm(fn):
    """fn()'s result, asserting that the igemm kernel ran (no silent cuDNN fallback)."""
    out = {}

    def call():
        out["r"] = fn()

    assert _ran_igemm(call), "igemm kernel did not run (cuDNN fallback)"
    return out["r"]


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


# ---- groups (ResNeXt) ----------------------------------------------------------------------
# Every grouped 3x3 shape of torchvision's ResNeXt-50 32x4d, ResNeXt-101 32x8d and 64x4d (batch
# 2) whose channels per group are multiples of 8 (stage 1 of 32x4d and 64x4d has 4: cuDNN in
# 16-bit, see GROUPED_FALLBACK), stride-2 first blocks included, plus odd grouped shapes.
def _resnext_shapes(groups, width_per_group, n=2):
    out = []
    for i, hw in enumerate([56, 28, 14, 7]):
        width = groups * width_per_group * 2 ** i
        if width // groups % 8:
            continue
        if i > 0:  # first block of the stage: stride 2 on the 3x3 (from the previous resolution)
            out.append(Conv(n, width, hw * 2, hw * 2, width, stride=2, groups=groups))
        out.append(Conv(n, width, hw, hw, width, groups=groups))
    return out


GROUPED = list(dict.fromkeys(
    _resnext_shapes(32, 4) + _resnext_shapes(32, 8) + _resnext_shapes(64, 4) + [
        Conv(3, 48, 9, 7, 24, groups=3),                      # Cg = 16, Kg = 8 (one 64 tile, 56 empty)
        Conv(1, 32, 6, 6, 400, groups=2),                     # Kg = 200: two 128 tiles, second partial
        Conv(2, 64, 13, 11, 64, padding=2, dilation=2, groups=4),  # dilation 2, Cg = Kg = 16
        Conv(3, 64, 15, 15, 128, r=1, stride=2, padding=0, groups=8),  # 1x1 grouped, s2 odd H
    ]))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", GROUPED, ids=str)
def test_conv_bn_act_igemm_grouped(case, dtype):
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype)
    s, p, d, g = case.args
    y = _run_igemm(lambda: FR.conv_bn_act(x, w, scale, shift, res, s, p, d, g, True, backend="cuda"))
    check_conv_bn_act(y, x, w, scale, shift, res, case, dtype, True, f"igemm grouped conv_bn_act {case}")


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", GROUPED, ids=str)
def test_conv_stats_igemm_grouped(case, dtype):
    x, w = conv_inputs(case, dtype)
    isc, ish = vec(case.c, dtype, positive=True), vec(case.c, dtype)
    s, p, d, g = case.args
    z, stats = _run_igemm(lambda: FR.conv_stats(x, w, isc, ish, True, s, p, d, g, backend="cuda"))
    check_conv_stats(z, stats, x, w, isc, ish, True, case, dtype, f"igemm grouped conv_stats {case}")


GROUPED_FALLBACK = [
    Conv(2, 128, 56, 56, 128, groups=32),  # resnext50_32x4d stage 1: C/groups = 4
    Conv(2, 256, 56, 56, 256, groups=64),  # resnext101_64x4d stage 1: C/groups = 4
]


@pytest.mark.filterwarnings("ignore:FUSED_RESNET_CUDA_CONV=igemm")
@pytest.mark.parametrize("case", GROUPED_FALLBACK, ids=str)
def test_grouped_cg4_falls_back_in_16bit(case):
    dtype = torch.bfloat16
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    s, p, d, g = case.args
    out = {}

    def run():
        out["y"] = FR.conv_bn_act(x, w, scale, shift, None, s, p, d, g, True, backend="cuda")

    assert not _ran_igemm(run)
    check_conv_bn_act(out["y"], x, w, scale, shift, None, case, dtype, True, f"C/g=4 fallback {case}")


# ---- float32: TF32 when allowed ----------------------------------------------------------------
# Error bound of igemm's TF32 path against float64, derived (not tuned):
#   * each mma operand is rounded to TF32 by cvt.rna (10 explicit mantissa bits: relative error
#     <= 2^-11); the prologue's float32 FMA adds <= 2^-24 to the A operand (U_OP below);
#   * a TF32 x TF32 product is exact in float32 and the accumulation of n = R*S*C/groups terms
#     in float32 errs by <= n * 2^-23 * sum|terms| (2^-23: one float32 ulp, so also right if
#     the tensor core truncates instead of rounding);
#   * the epilogue (FMA with scale / shift, + residual) rounds twice in float32;
# so |conv_tf32 - conv| <= ((1 + U_OP)^2 - 1 + n * 2^-23) * conv(|x|, |w|) elementwise.
U_OP = 2.0**-11 + 2.0**-23
U32 = 2.0**-23


def tf32_conv_bound(xt64, w64, case):
    """Elementwise bound on |conv in TF32 - conv in float64| for float64 (transformed) x and w."""
    n = case.c // case.groups * case.r * case.r
    return ((1 + U_OP) ** 2 - 1 + n * U32) * F.conv2d(xt64.abs(), w64.abs(), None, *case.args)


def _assert_bound(actual, expected, bound, what):
    a, e = d64(actual), d64(expected)
    assert a.shape == e.shape and torch.isfinite(a).all(), what
    excess = ((a - e).abs() - bound).max().item()
    worst = ((a - e).abs() / bound.clamp_min(1e-300)).max().item()
    assert excess <= 0, f"{what}: error exceeds the derived TF32 bound (max err/bound {worst:.3f})"


@pytest.fixture
def tf32_on():
    torch.backends.cudnn.allow_tf32 = True  # the flag PyTorch's convolutions follow
    yield
    torch.backends.cudnn.allow_tf32 = False  # no_tf32_seeded restores the original after


F32_CASES = [RN50[1], RN50[3], RN50[8], RN50[-1]] + ODD + [
    GROUPED[0], GROUPED[-3], GROUPED[-2],
    Conv(2, 128, 14, 14, 128, groups=32),   # C/groups = 4: float32 (4-element vectors) runs it
]


@pytest.mark.parametrize("case", F32_CASES, ids=str)
def test_conv_bn_act_tf32(case, tf32_on):
    dtype = torch.float32
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype)
    s, p, d, g = case.args
    y = _run_igemm(lambda: FR.conv_bn_act(x, w, scale, shift, res, s, p, d, g, True, backend="cuda"))
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    expected = ref.conv_bn_act(d64(x), d64(w), d64(scale), d64(shift), d64(res), *case.args, relu=True)
    conv = F.conv2d(d64(x), d64(w), None, *case.args)
    sc, sh = d64(scale).view(1, -1, 1, 1), d64(shift).view(1, -1, 1, 1)
    bound = (sc.abs() * tf32_conv_bound(d64(x), d64(w), case)
             + 2 * U32 * ((sc * conv).abs() + sh.abs() + d64(res).abs()))
    _assert_bound(y, expected, bound, f"TF32 conv_bn_act {case}")


@pytest.mark.parametrize("case", F32_CASES, ids=str)
def test_conv_stats_tf32(case, tf32_on):
    dtype = torch.float32
    x, w = conv_inputs(case, dtype)
    isc, ish = vec(case.c, dtype, positive=True), vec(case.c, dtype)
    s, p, d, g = case.args
    z, stats = _run_igemm(lambda: FR.conv_stats(x, w, isc, ish, True, s, p, d, g, backend="cuda"))
    ez, estats = ref.conv_stats(d64(x), d64(w), d64(isc), d64(ish), True, *case.args)
    xt = torch.relu(d64(x) * d64(isc).view(1, -1, 1, 1) + d64(ish).view(1, -1, 1, 1))
    b = tf32_conv_bound(xt, d64(w), case)
    _assert_bound(z, ez, b, f"TF32 conv_stats z {case}")
    # Statistics: mean errs by at most the mean bound; M2(z + e) - M2(z) =
    # 2 sum (z - zbar)(e - ebar) + sum (e - ebar)^2, |e - ebar| <= b + bbar; plus float32 storage.
    dims = (0, 2, 3)
    bbar = b.mean(dim=dims, keepdim=True)
    dev = (ez - ez.mean(dim=dims, keepdim=True)).abs()
    mean_bound = bbar.flatten() + U32 * estats[0].abs()
    m2_bound = (2 * (dev * (b + bbar)).sum(dim=dims) + ((b + bbar) ** 2).sum(dim=dims)
                + U32 * estats[1].abs())
    _assert_bound(stats[0], estats[0], mean_bound, f"TF32 mean {case}")
    _assert_bound(stats[1], estats[1], m2_bound, f"TF32 M2 {case}")
    own = stats_of(d64(z))  # the reduction alone, against the returned z
    assert ((d64(stats[1]) - own[1]).abs() / own[1].clamp_min(1e-30)).max().item() <= 2e-5


def _tf32_round_nearest_away(t):
    """float32 -> TF32 (10 explicit mantissa bits) rounded to nearest, ties away from zero, by bit
    arithmetic on the magnitude (what cvt.rna.tf32.f32 is documented to do); finite inputs."""
    b = t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = (b + 0x1000) & ~0x1FFF
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def test_tf32_operands_rounded_not_truncated(tf32_on):
    """With an identity 1x1 weight (exact in TF32) each output is one x value as the mma saw it:
    it must equal x rounded to nearest TF32 -- a truncating kernel differs on ~half the values."""
    case = Conv(2, 8, 6, 6, 8, r=1, padding=0)
    x = rand(case.n, case.c, case.h, case.w, dtype=torch.float32)
    w = torch.eye(8, device=DEV).view(8, 8, 1, 1).contiguous(memory_format=CL)
    one, zero = torch.ones(8, device=DEV), torch.zeros(8, device=DEV)
    s, p, d, g = case.args
    y = _run_igemm(lambda: FR.conv_bn_act(x, w, one, zero, None, s, p, d, g, False, backend="cuda"))
    expected = _tf32_round_nearest_away(x)
    truncated = (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
    assert not torch.equal(expected, truncated)  # the input does tell the two apart
    assert torch.equal(y, expected.contiguous(memory_format=CL))


@pytest.mark.filterwarnings("ignore:FUSED_RESNET_CUDA_CONV=igemm")
def test_tf32_flag_governs_float32():
    """float32 runs igemm only under the cuDNN (convolution) TF32 flag; the matmul flag is not it."""
    case = Conv(2, 64, 14, 14, 64)
    x, w = conv_inputs(case, torch.float32)
    scale, shift = vec(case.k), vec(case.k)
    s, p, d, g = case.args

    def run():
        return FR.conv_bn_act(x, w, scale, shift, None, s, p, d, g, True, backend="cuda")

    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True
        assert not _ran_igemm(run)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        assert _ran_igemm(run)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


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
    (Conv(2, 64, 14, 14, 64), torch.float32),           # float32 with TF32 off (the suite's default)
    (Conv(2, 128, 14, 14, 128, groups=32), torch.bfloat16),  # grouped, C/groups = 4
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


# ---- the cached channels_last weight (ops_cuda.cpp igemm_weight) -------------------------------
def _nchw_weight_case(dtype=torch.bfloat16):
    case = Conv(2, 64, 14, 14, 128)
    x, w = conv_inputs(case, dtype)
    w = w.contiguous()  # NCHW-contiguous, as an unconverted nn.Conv2d: igemm needs a (K, R, S, C) copy
    assert not w.is_contiguous(memory_format=CL)
    return case, x, w, vec(case.k, dtype, positive=True), vec(case.k, dtype)


def test_weight_cache_hit_and_inplace_update(monkeypatch):
    monkeypatch.delenv("FUSED_RESNET_CUDA_WEIGHT_CACHE", raising=False)
    dtype = torch.bfloat16
    case, x, w, scale, shift = _nchw_weight_case(dtype)
    s, p, d, g = case.args
    out = {}

    def run():
        out["y"] = FR.conv_bn_act(x, w, scale, shift, None, s, p, d, g, True, backend="cuda")

    miss = _kernels(run)
    hit = _kernels(run)
    assert any("igemm_kernel" in n for n in hit)
    assert len(hit) < len(miss), (miss, hit)  # the hit launches no weight copy
    check_conv_bn_act(out["y"], x, w, scale, shift, None, case, dtype, True, "cached weight")
    with torch.no_grad():
        w.mul_(-0.5).add_(0.01)  # in place: bumps the version counter -> the cache must repack
    again = _kernels(run)
    assert len(again) == len(miss), (miss, again)
    check_conv_bn_act(out["y"], x, w, scale, shift, None, case, dtype, True, "weight updated in place")


def test_weight_cache_off_switch(monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_CUDA_WEIGHT_CACHE", "0")
    case, x, w, scale, shift = _nchw_weight_case()
    s, p, d, g = case.args

    def run():
        FR.conv_bn_act(x, w, scale, shift, None, s, p, d, g, True, backend="cuda")

    first, second = _kernels(run), _kernels(run)
    assert len(first) == len(second) and any("igemm_kernel" in n for n in second)


def test_weight_cache_bypassed_under_graph_capture():
    """A captured call copies the live weight on every replay: an in-place update is seen."""
    dtype = torch.bfloat16
    case, x, w, scale, shift = _nchw_weight_case(dtype)
    s, p, d, g = case.args
    ops = torch.ops.fused_resnet

    def step():
        return ops.conv_bn_act(x, w, scale, shift, None, s, p, d, g, True)

    step()  # an eager call first: a cache entry exists before the capture
    graph, y = capture(step)
    with torch.no_grad():
        w.copy_(rand(*w.shape, dtype=dtype, channels_last=False) * 0.05)
    graph.replay()
    torch.cuda.synchronize()
    check_conv_bn_act(y, x, w, scale, shift, None, case, dtype, True, "graph replay after weight update")
