"""The oneDNN fast path of the CPU conv_bn_act (csrc/cpu/onednn.cpp): float32 calls run as one
oneDNN convolution with fused post-ops on folded, pre-packed, cached weights.

Which path ran is observed from the dispatcher through the profiler (the fast path calls
``mkldnn::_convolution_pointwise`` and packs with ``mkldnn::_reorder_convolution_weight``);
every result is compared with the float64 reference on fresh random inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    ODD_CASES,
    RESNET_CASES,
    ConvCase,
    assert_matches,
    conv_inputs,
    f64,
    rand,
    requires_c,
    run_in_threads,
    vec,
)

from fused_resnet import functional as FF
from fused_resnet import reference as ref


def _built_with_fastpath() -> bool:
    """Whether the loaded _C contains csrc/cpu/onednn.cpp (an in-place build older than it does not)."""
    try:
        import fused_resnet._C as C

        with open(C.__file__, "rb") as f:
            return b"fused_resnet: oneDNN is disabled" in f.read()
    except (ImportError, OSError):
        return False


pytestmark = [
    requires_c,
    pytest.mark.skipif(not _built_with_fastpath(), reason="fused_resnet._C predates csrc/cpu/onednn.cpp: rebuild"),
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"),
    # Any fused_resnet warning (oneDNN missing / rejecting a call) fails these tests.
    pytest.mark.filterwarnings("error:fused_resnet:UserWarning"),
]

POINTWISE = "mkldnn::_convolution_pointwise"
REORDER = "mkldnn::_reorder_convolution_weight"


def _pairs(case):
    return dict(stride=(case.stride,) * 2, padding=(case.padding,) * 2, dilation=(case.dilation,) * 2,
                groups=case.groups)


def _expected(x, w, s, b, r, case, relu=True):
    return ref.conv_bn_act(f64(x), f64(w), f64(s), f64(b), f64(r), relu=relu, **_pairs(case))


def _ops_called(fn):
    """(result, {op name: count}) of the dispatcher ops fn() called."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    counts = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    return out, counts


def _call(x, w, s, b, r, case, relu=True):
    return FF.conv_bn_act(x, w, s, b, r, relu=relu, backend="cpu", **case.conv_args)


@pytest.mark.parametrize("case", RESNET_CASES + ODD_CASES, ids=str)
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (False, False), (True, False)])
def test_float32_takes_fast_path_and_matches(case, residual, relu):
    x, w, s, b, r = conv_inputs(case, torch.float32, residual=residual)
    r_before = None if r is None else r.clone()
    y, ops = _ops_called(lambda: _call(x, w, s, b, r, case, relu))
    # A 1x1 output with a shortcut runs oneDNN's in-place overload on a copy of the shortcut
    # (torch 2.11's out-of-place overload fails there, see csrc/cpu/onednn.cpp).
    one_pixel = residual and y.shape[2] * y.shape[3] == 1
    assert ops.get(POINTWISE + ("_" if one_pixel else ""), 0) == 1, f"fast path not taken: {sorted(ops)}"
    if r is not None:
        assert torch.equal(r, r_before), "conv_bn_act wrote into its residual"
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == torch.empty(y.shape, memory_format=torch.channels_last).stride()  # as the fake kernel
    assert_matches(y, _expected(x, w, s, b, r, case, relu), torch.float32)


@pytest.mark.parametrize("case,residual", [(ConvCase(8, 256, 14, 14, 1024, 1, 1, padding=0), True),
                                           (ConvCase(8, 256, 14, 14, 256), False)], ids=str)
def test_resnet50_layer3_shapes(case, residual):
    """ResNet-50 layer3 at batch 8: the bottleneck's 3x3, and its end (1x1 256 -> 1024 + shortcut)."""
    x, w, s, b, r = conv_inputs(case, residual=residual)
    y, ops = _ops_called(lambda: _call(x, w, s, b, r, case))
    assert ops.get(POINTWISE, 0) == 1
    assert_matches(y, _expected(x, w, s, b, r, case), torch.float32)


def test_layouts_and_strided_vectors():
    """NCHW x and residual, channels_last weight (a model moved to channels_last), strided scale/shift."""
    case = ConvCase(2, 16, 9, 9, 24, stride=2)
    x, w, _, _, r = conv_inputs(case, residual=True)
    x, r = x.contiguous(), r.contiguous()
    w = w.contiguous(memory_format=torch.channels_last)
    s, b = vec(48, positive=True)[::2], vec(48)[1::2]
    y, ops = _ops_called(lambda: _call(x, w, s, b, r, case))
    assert ops.get(POINTWISE, 0) == 1
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, _expected(x, w, s, b, r, case), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_keep_unfused_kernel(dtype):
    case = ConvCase(2, 16, 8, 8, 16)
    x, w, s, b, r = conv_inputs(case, dtype, residual=True)
    y, ops = _ops_called(lambda: _call(x, w, s, b, r, case))
    assert POINTWISE not in ops
    low = ref.conv_bn_act(x, w, s, b, r, **_pairs(case)) if dtype != torch.float64 else None
    assert_matches(y, _expected(x, w, s, b, r, case), dtype, low)


def test_weight_cache_hit_and_invalidation():
    case = ConvCase(2, 32, 8, 8, 48)
    x, w, s, b, r = conv_inputs(case, residual=True)

    def run_and_check(expect_pack):
        y, ops = _ops_called(lambda: _call(x, w, s, b, r, case))
        assert ops.get(REORDER, 0) == expect_pack, f"expected {expect_pack} weight packs, got {ops.get(REORDER, 0)}"
        assert_matches(y, _expected(x, w, s, b, r, case), torch.float32)

    run_and_check(1)  # first call packs
    run_and_check(0)  # same weight, scale, shapes: cached
    with torch.no_grad():
        w.mul_(-1.5)  # in place: version bump
    run_and_check(1)
    run_and_check(0)
    s.add_(0.25)  # scale changed in place
    run_and_check(1)
    s = s.clone()  # a new scale tensor with the same values: still valid (values are compared)
    run_and_check(0)
    w.detach()[0, 0, 0, 0] += 3.0  # through a view sharing the version counter
    run_and_check(1)
    b = vec(case.k)  # shift is the bias, never cached
    run_and_check(0)
    x = rand(3, case.c, case.h, case.w)  # another batch size: packed for the new input shape
    r = rand(3, case.k, case.h, case.w)
    run_and_check(1)


def test_new_weight_at_reused_address():
    """A freed weight's memory may be handed to the next one (same shape, version 0): never a stale hit."""
    case = ConvCase(2, 16, 6, 6, 16)
    x, _, s, b, _ = conv_inputs(case)
    for _ in range(4):
        w = rand(case.k, case.c, 3, 3)
        assert_matches(_call(x, w, s, b, None, case), _expected(x, w, s, b, None, case), torch.float32)
        del w


def test_weights_sharing_one_storage():
    case = ConvCase(2, 8, 6, 6, 8)
    x, _, s, b, _ = conv_inputs(case)
    flat = rand(2 * 8 * 8 * 9, channels_last=False) * 0.3
    w1, w2 = flat[: 8 * 8 * 9].view(8, 8, 3, 3), flat[8 * 8 * 9:].view(8, 8, 3, 3)
    for w in (w1, w2, w1, w2):
        assert_matches(_call(x, w, s, b, None, case), _expected(x, w, s, b, None, case), torch.float32)


def test_inference_mode_weights_not_cached():
    case = ConvCase(2, 16, 6, 6, 16)
    with torch.inference_mode():
        x, w, s, b, _ = conv_inputs(case)
        for _ in range(2):
            y, ops = _ops_called(lambda: _call(x, w, s, b, None, case))
            assert ops.get(POINTWISE, 0) == 1 and REORDER not in ops
            assert_matches(y, _expected(x, w, s, b, None, case), torch.float32)
        w.mul_(2.0)  # inference tensors have no version counter: folded per call, so this is seen
        assert_matches(_call(x, w, s, b, None, case), _expected(x, w, s, b, None, case), torch.float32)


def test_autograd_through_fast_path():
    case = ConvCase(2, 8, 6, 6, 8)
    x, w, s, b, r = conv_inputs(case, residual=True)
    leaves = [t.clone().requires_grad_() for t in (x, w, s, b, r)]
    y = _call(*leaves, case)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    ref_leaves = [f64(t).requires_grad_() for t in (x, w, s, b, r)]
    expected = torch.autograd.grad(ref.conv_bn_act(*ref_leaves, **_pairs(case)), ref_leaves, g.double())
    for name, a, e in zip("x w scale shift residual".split(), got, expected, strict=True):
        assert_matches(a, e, torch.float32, what=f"grad {name}")


def test_threads_share_the_cache():
    cases = [ConvCase(2, 16, 8, 8, 16 + 8 * i) for i in range(4)]
    inputs = [conv_inputs(c, residual=True) for c in cases]
    def work(i):
        for _ in range(5):
            x, w, s, b, r = inputs[i]
            assert_matches(_call(x, w, s, b, r, cases[i]), _expected(x, w, s, b, r, cases[i]), torch.float32)

    errors = run_in_threads(work, 4)
    assert not errors, errors


def test_env_switch_turns_fast_path_off(monkeypatch):
    case = ConvCase(2, 16, 8, 8, 16)
    x, w, s, b, r = conv_inputs(case, residual=True)
    monkeypatch.setenv("FUSED_RESNET_CPU_ONEDNN", "0")
    y, ops = _ops_called(lambda: _call(x, w, s, b, r, case))
    assert POINTWISE not in ops
    assert_matches(y, _expected(x, w, s, b, r, case), torch.float32)


_DISABLED_SCRIPT = r"""
import warnings, torch
from fused_resnet import functional as FF, reference as ref
torch.manual_seed(0)
x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
w, s, b = torch.randn(8, 8, 3, 3) * 0.3, torch.rand(8) + 0.5, torch.randn(8)
with warnings.catch_warnings(record=True) as caught, torch.backends.mkldnn.flags(enabled=False):
    warnings.simplefilter("always")
    ys = [FF.conv_bn_act(x, w, s, b, padding=1, backend="cpu") for _ in range(3)]
e = ref.conv_bn_act(x.double(), w.double(), s.double(), b.double(), padding=(1, 1))
print("MAXERR", max((y.double() - e).abs().max().item() for y in ys) / e.abs().max().item())
msgs = [str(c.message) for c in caught if str(c.message).startswith("fused_resnet: oneDNN")]
print("NWARN", len(msgs))
print("MSG", msgs[0] if msgs else "")
print("CATEGORY", [c.category.__name__ for c in caught if str(c.message).startswith("fused_resnet: oneDNN")])
"""


def test_disabled_onednn_falls_back_and_says_so_once():
    env = dict(os.environ, FUSED_RESNET_QUIET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _DISABLED_SCRIPT], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0] in
                 ("MAXERR", "NWARN", "MSG", "CATEGORY"))
    assert float(lines["MAXERR"]) <= 2e-5
    assert lines["NWARN"] == "1"
    assert "torch.backends.mkldnn.enabled is False" in lines["MSG"] and "unfused path" in lines["MSG"]
    assert lines["CATEGORY"] == "['FallbackWarning']"


# ----------------------------------------------------------------------------- training kernels
# The row loops of bn_add_act, bn_add_act_backward, stats_backward and conv_stats' statistics are
# compiled twice (baseline and AVX2, picked at run time; FUSED_RESNET_CPU_AVX2=0 forces the
# baseline); their per-channel sums are float64 with exact products (csrc/cpu/cpu_kernels.h,
# bn.cpp, conv.cpp). float32 sums were tried and broke the model-level training check, because
# the backward subtracts mean * sum(g) from sum(g * z): these tests hold the float64 accuracy.

_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
_OPS = torch.ops.fused_resnet


def _training_kernel_outputs(dtype, k, seed):
    """Every output of the four training kernels on one set of fresh random inputs."""
    g = torch.Generator().manual_seed(seed)

    def act(*shape, offset=0.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) + offset
        return t.to(dtype).contiguous(memory_format=torch.channels_last)

    def v(n, positive=False):
        t = torch.randn(n, generator=g, dtype=torch.float64)
        return (t.abs() + 0.5 if positive else t).to(ref.acc_dtype(dtype))

    n, h, w = 2, 24, 24  # 1152 pixel rows: several 256-row chunks, 16-row blocks and a tail
    z, go, r = act(n, k, h, w), act(n, k, h, w), act(n, k, h, w)
    s, b, rs, rb = v(k, True), v(k), v(k, True), v(k)
    x = act(n, 5, h + 2, w + 2, offset=3.0)
    wt = (torch.randn(k, 5, 3, 3, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    zs, stats = _OPS.conv_stats(x, wt, v(5, True), v(5), True, [1, 1], [0, 0], [1, 1], 1)
    return [
        *_OPS.bn_add_act_backward(go, z, s, b, None, None, None, True),
        *_OPS.bn_add_act_backward(go, z, s, b, r, rs, rb, True),
        _OPS.bn_add_act(z, s, b, r, rs, rb, True),
        _OPS.stats_backward(go, torch.stack([v(k), v(k)]), z, torch.stack([v(k), v(k, True)]), n * h * w),
        zs, stats,
    ]


@pytest.mark.skipif(not _AVX2, reason="this CPU has no AVX2: only the baseline version runs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [67, 256])
def test_training_kernels_avx2_and_baseline_same_bits(monkeypatch, dtype, k):
    # No FMA in the AVX2 version and a fixed summation order: the two versions agree bit for bit.
    fast = _training_kernel_outputs(dtype, k, seed=k)
    monkeypatch.setenv("FUSED_RESNET_CPU_AVX2", "0")
    base = _training_kernel_outputs(dtype, k, seed=k)
    for i, (a, e) in enumerate(zip(fast, base, strict=True)):
        assert torch.equal(a, e), f"output {i} ({dtype}, K={k}) differs between the AVX2 and baseline versions"


def test_backward_sums_are_float64_accurate():
    # 4x28x28 = 3136 rows, K = 67, z offset so |mean| >> std: grad_scale = sum(g*z),
    # grad_shift = sum(g) and grad_res_scale = sum(g*r) must be the float64 sums of exact
    # products, rounded once to float32 -- a float32 accumulation (error ~1e-7 of sum(|terms|))
    # fails this bound.
    k = 67
    z, go, r = rand(4, k, 28, 28, offset=20.0), rand(4, k, 28, 28), rand(4, k, 28, 28)
    s, b, rs, rb = vec(k, positive=True), vec(k), vec(k, positive=True), vec(k)
    _, gs, gb, gr, grs = _OPS.bn_add_act_backward(go, z, s, b, r, rs, rb, True)

    def c(t):
        return f64(t).view(-1, 1, 1)

    pre = f64(z) * c(s) + c(b) + (f64(r) * c(rs) + c(rb))
    g = torch.where(pre > 0, f64(go), torch.zeros((), dtype=torch.float64))
    dims = (0, 2, 3)
    for name, got, terms in (("grad_scale", gs, g * f64(z)), ("grad_shift", gb, g),
                             ("grad_res_scale", grs, g * f64(r))):
        exact = terms.sum(dims)
        err = (f64(got) - exact).abs()
        bound = 2.0**-24 * exact.abs() + 1e-12 * terms.abs().sum(dims)
        assert bool((err <= bound).all()), f"{name}: worst error / bound = {(err / bound).max().item():.2f}"
    # The elementwise output: g * res_scale in float32 is the float64 product rounded once.
    assert torch.equal(gr, (g * c(rs)).float())


def test_conv_stats_mean_far_from_zero():
    # |mean| >> std over many chunks: mean 1000, std ~1 (z = conv of x with a constant-ish bias
    # channel). The statistics must be those of the returned z, computed in float64.
    x = rand(4, 8, 30, 30)
    x[:, 0] = 500.0 + torch.rand(4, 30, 30)  # channel 0 carries a large positive offset
    x = x.contiguous(memory_format=torch.channels_last)
    w = rand(16, 8, 1, 1, channels_last=False)
    w[:, 0] = 2.0  # every output channel picks up ~1000 from channel 0
    z, stats = _OPS.conv_stats(x, w, None, None, False, [1, 1], [0, 0], [1, 1], 1)
    zz = f64(z)
    mean = zz.mean((0, 2, 3))
    m2 = ((zz - mean.view(-1, 1, 1)) ** 2).sum((0, 2, 3))
    count = 4 * 30 * 30
    assert float(mean.abs().min()) > 900 and float((m2 / count).max()) < 50  # the regime under test
    # float64 sums around a shift, rounded once to float32 (half an ulp: 2^-24 relative).
    torch.testing.assert_close(f64(stats[0]), mean, rtol=1.5e-7, atol=0)
    torch.testing.assert_close(f64(stats[1]), m2, rtol=1.5e-7, atol=0)
