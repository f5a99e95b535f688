"""The CUDA backend (csrc/cuda) against the executable spec, op by op.

Every op is called through ``torch.ops.fused_resnet.*`` (so the CUDA dispatch key and the C++
argument checks are what is tested) and compared with :mod:`fused_resnet.reference` run on
float64 copies of the same inputs. Tolerances follow the design's rule: the error against the
float64 reference may be at most 2x the error of PyTorch's own eager computation in the same
dtype (F.conv2d + BatchNorm math + add + relu, each rounded to that dtype as an eager model
would), plus a small floor scaled by the output's magnitude. TF32 is switched off so float32
is held to float32 accuracy.

Shapes are real ResNet-50 layers at batch 8 plus odd ones (batch 1, H = W = 1, odd channel
counts, groups, dilation). Also covered: large |mean| statistics, bitwise determinism, empty
batches, CUDA graph capture and replay, and argument errors naming the argument.

Needs a CUDA device and a build with the CUDA kernels; skips cleanly otherwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_common import (  # noqa: F401  (no_tf32_seeded: an autouse fixture)
    CL,
    DEV,
    Conv,
    assert_nhwc,
    assert_rule,
    bc,
    capture,
    conv_inputs,
    d64,
    eager_bn,
    eager_conv_bn_act,
    eager_prologue,
    rand,
    stats_of,
    vec,
)

try:
    import fused_resnet  # noqa: F401  (loads fused_resnet._C, which registers the kernels)
    from fused_resnet import reference as ref
except Exception:  # pragma: no cover - keeps the module collectable while the package changes
    ref = None

OPS = ("conv_bn_act", "conv_stats", "bn_finalize", "bn_update_running_stats", "bn_add_act",
       "bn_add_act_backward", "stats_backward", "bn_finalize_backward")


def _has_cuda_kernels() -> bool:
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", "CUDA")
                   for op in OPS)
    except RuntimeError:  # the ops are not even declared (no _C loaded)
        return False


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(ref is None or not _has_cuda_kernels(),
                       reason="fused_resnet._C has no CUDA kernels (built without CUDA?)"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOWP = (torch.float16, torch.bfloat16)


def ops():
    return torch.ops.fused_resnet


# Inputs, eager baselines and the 2x rule: gpu_common.py; TF32 off + seeding: its no_tf32_seeded fixture.
RESNET50 = [
    Conv(8, 3, 224, 224, 64, r=7, stride=2, padding=3),  # stem
    Conv(8, 64, 56, 56, 64),  # conv2_x 3x3
    Conv(8, 256, 56, 56, 128, r=1, stride=2, padding=0),  # 1x1 stride 2
    Conv(8, 1024, 14, 14, 256, r=1, padding=0),  # conv5 entry 1x1 reduce
]
ODD = [
    Conv(1, 64, 1, 1, 10, r=1, padding=0),  # batch 1, H = W = 1
    Conv(2, 5, 9, 7, 7),  # odd channels (scalar path), non-square
    Conv(2, 128, 14, 14, 128, groups=32),  # ResNeXt grouped 3x3
    Conv(2, 16, 13, 13, 24, padding=2, dilation=2),  # dilation 2
    Conv(2, 32, 15, 15, 36, stride=2),  # stride 2, odd spatial, channels % 8 != 0
]
CASES = RESNET50 + ODD


# ---------------------------------------------------------------------------------------
# conv_bn_act


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False), (False, False)],
                         ids=["relu", "res-relu", "res", "plain"])
def test_conv_bn_act(case, dtype, residual, relu):
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype) if residual else None
    y = ops().conv_bn_act(x, w, scale, shift, res, *case.args, relu)
    assert_nhwc(y)
    assert y.dtype == dtype
    expected = ref.conv_bn_act(d64(x), d64(w), d64(scale), d64(shift), d64(res), *case.args, relu=relu)
    eager = eager_conv_bn_act(x, w, scale, shift, res, case, relu)
    assert_rule(y, expected, dtype, eager, f"conv_bn_act {case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [RESNET50[1], RESNET50[3], ODD[1]], ids=str)
def test_conv_bn_act_residual_writes_conv_bn_act_into_the_residual(case, dtype):
    """CUDA computes it out of place and copies: exactly conv_bn_act's result, in residual's memory."""
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype)
    expected = ops().conv_bn_act(x, w, scale, shift, res, *case.args, True)
    ptr, version = res.data_ptr(), res._version
    assert ops().conv_bn_act_residual_(x, w, scale, shift, res, *case.args, True) is None
    assert res.data_ptr() == ptr and res._version > version
    assert torch.equal(res, expected)
    with pytest.raises(RuntimeError, match="residual: must not share memory with x"):
        sq = rand(2, 8, 6, 6, dtype=dtype)
        ops().conv_bn_act_residual_(sq, rand(8, 8, 3, 3, dtype=dtype), vec(8, dtype), vec(8, dtype), sq,
                                    [1, 1], [1, 1], [1, 1], 1, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_conv_bn_act_any_input_layout(dtype):
    """NCHW x / residual, strided vectors and misaligned (scalar-path) tensors all work."""
    case = Conv(2, 64, 10, 10, 64)
    x, w = conv_inputs(case, dtype)
    scale = vec(2 * case.k, dtype, positive=True)[::2]
    shift = vec(case.k, dtype)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype)
    expected = ref.conv_bn_act(d64(x), d64(w), d64(scale), d64(shift), d64(res), *case.args, relu=True)
    eager = eager_conv_bn_act(x, w, scale, shift, res, case, True)
    # NCHW inputs
    y = ops().conv_bn_act(x.contiguous(), w, scale, shift, res.contiguous(), *case.args, True)
    assert_nhwc(y)
    assert_rule(y, expected, dtype, eager, "NCHW inputs")
    # channels_last residual whose data pointer is one element off 16-byte alignment
    buf = torch.empty(res.numel() + 1, dtype=dtype, device=DEV)
    mis = buf[1:].view(case.n, *case.out_hw(), case.k).permute(0, 3, 1, 2)
    mis.copy_(res)
    assert mis.is_contiguous(memory_format=CL) and mis.data_ptr() % 16 != 0
    y2 = ops().conv_bn_act(x, w, scale, shift, mis, *case.args, True)
    assert_rule(y2, expected, dtype, eager, "misaligned residual")


# ---------------------------------------------------------------------------------------
# conv_stats

PROLOGUES = {
    "none": (False, False, False),
    "bn-relu": (True, True, True),
    "shift": (False, True, False),
    "relu": (False, False, True),
    "scale": (True, False, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("prologue", ["none", "bn-relu"])
def test_conv_stats(case, dtype, prologue):
    _check_conv_stats(case, dtype, prologue)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prologue", ["shift", "relu", "scale"])
def test_conv_stats_partial_prologue(dtype, prologue):
    _check_conv_stats(Conv(2, 24, 11, 11, 40), dtype, prologue)


def _check_conv_stats(case, dtype, prologue):
    has_scale, has_shift, in_relu = PROLOGUES[prologue]
    x, w = conv_inputs(case, dtype)
    in_scale = vec(case.c, dtype, positive=True) if has_scale else None
    in_shift = vec(case.c, dtype) if has_shift else None
    z, stats = ops().conv_stats(x, w, in_scale, in_shift, in_relu, *case.args)
    assert_nhwc(z, "z")
    assert z.dtype == dtype and stats.dtype == ref.acc_dtype(dtype) and stats.shape == (2, case.k)
    ez, estats = ref.conv_stats(d64(x), d64(w), d64(in_scale), d64(in_shift), in_relu, *case.args)
    s, p, d, g = case.args
    eager_z = F.conv2d(eager_prologue(x, in_scale, in_shift, in_relu), w, None, s, p, d, g)
    eager_s = stats_of(eager_z)
    what = f"conv_stats {case} prologue={prologue}"
    assert_rule(z, ez, dtype, eager_z, what + " z")
    assert_rule(stats[0], estats[0], dtype, eager_s[0], what + " mean")
    assert_rule(stats[1], estats[1], dtype, eager_s[1], what + " M2")
    # The statistics of the z actually returned, against float64 statistics of that same z:
    # this isolates the reduction from the convolution's rounding.
    own = stats_of(d64(z))
    tight = 1e-12 if dtype == torch.float64 else 2e-6
    assert (d64(stats[0]) - own[0]).abs().max().item() <= tight * max(own[0].abs().max().item(), 1.0)
    m2_rel = ((d64(stats[1]) - own[1]).abs() / own[1].clamp_min(1e-30)).max().item()
    assert m2_rel <= (1e-10 if dtype == torch.float64 else 2e-5), f"{what}: M2 relative error {m2_rel:.3e}"


# (dtype, offset, spread): |mean| / std of z ~ 8 * offset / spread. float16/bfloat16 cannot
# resolve a spread much below their spacing at the offset, so their cases are milder.
LARGE_MEAN = [(dt, o, s) for dt in (torch.float32, torch.float64)
              for o, s in [(1e3, 1.0), (-2e4, 3.0), (5e2, 0.05)]]
LARGE_MEAN += [(torch.float16, 60.0, 8.0), (torch.bfloat16, -60.0, 8.0)]


@pytest.mark.parametrize("dtype,offset,spread", LARGE_MEAN, ids=str)
def test_conv_stats_large_mean(dtype, offset, spread):
    """|mean| >> std: M2 stays accurate (a float32 sum / sum-of-squares would lose all digits)."""
    n, c, h, wd, k = 8, 64, 28, 28, 48
    x = rand(n, c, h, wd, dtype=dtype, scale=spread, offset=offset)
    w = (torch.full((k, c, 1, 1), 1.0 / c, dtype=torch.float64, device=DEV)
         * (1 + 0.01 * torch.randn(k, 1, 1, 1, dtype=torch.float64, device=DEV))).to(dtype)
    w = w.contiguous(memory_format=CL)
    z, stats = ops().conv_stats(x, w, None, None, False, [1, 1], [0, 0], [1, 1], 1)
    own = stats_of(d64(z))
    std = (own[1] / (n * h * wd)).sqrt()
    assert (std > 0).all() and (own[0].abs() > 10 * std).all(), "not a large-mean case"
    mean_err = ((d64(stats[0]) - own[0]).abs() / own[0].abs()).max().item()
    m2_rel = ((d64(stats[1]) - own[1]).abs() / own[1]).max().item()
    assert mean_err <= (1e-14 if dtype == torch.float64 else 1e-6), f"mean relative error {mean_err:.3e}"
    lim = 1e-9 if dtype == torch.float64 else 3e-5
    assert m2_rel <= lim, f"M2 relative error {m2_rel:.3e} (|mean|/std up to {(own[0].abs() / std).max().item():.1e})"


# ---------------------------------------------------------------------------------------
# bn_add_act and its backward

DUAL = {  # residual, res_scale, res_shift
    "none": (False, False, False),
    "res": (True, False, False),
    "dual": (True, True, True),
    "res-scale": (True, True, False),
    "res-shift": (True, False, True),
}
ACT_SHAPES = [(8, 256, 56, 56), (8, 2048, 7, 7), (1, 7, 5, 3), (3, 64, 1, 1)]


def _bn_inputs(shape, dtype, variant):
    has_res, has_rs, has_rsh = DUAL[variant]
    k = shape[1]
    z = rand(*shape, dtype=dtype)
    res = rand(*shape, dtype=dtype) if has_res else None
    rs = vec(k, dtype, positive=True) if has_rs else None
    rsh = vec(k, dtype) if has_rsh else None
    return z, vec(k, dtype, positive=True), vec(k, dtype), res, rs, rsh


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", list(DUAL))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_bn_add_act(shape, dtype, variant, relu):
    z, scale, shift, res, rs, rsh = _bn_inputs(shape, dtype, variant)
    y = ops().bn_add_act(z, scale, shift, res, rs, rsh, relu)
    assert_nhwc(y)
    expected = ref.bn_add_act(d64(z), d64(scale), d64(shift), d64(res), d64(rs), d64(rsh), relu)
    eager = eager_bn(z, scale, shift)
    if res is not None:
        r = res
        if rs is not None or rsh is not None:
            acc = ref.acc_dtype(dtype)
            r = res.to(acc)
            r = r * bc(rs) if rs is not None else r
            r = r + bc(rsh) if rsh is not None else r
            r = r.to(dtype)
        eager = eager + r
    eager = torch.relu(eager) if relu else eager
    assert_rule(y, expected, dtype, eager, f"bn_add_act {shape} {variant}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", list(DUAL))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_bn_add_act_backward(shape, dtype, variant, relu):
    z, scale, shift, res, rs, rsh = _bn_inputs(shape, dtype, variant)
    pre = ref.bn_add_act(d64(z), d64(scale), d64(shift), d64(res), d64(rs), d64(rsh), relu=False)
    # Where the pre-activation is within rounding of 0 the ReLU mask may legitimately differ
    # between precisions; a zero upstream gradient there makes the comparison well-posed.
    go = rand(*shape, dtype=dtype)
    go = torch.where(pre.abs() < 1e-3, torch.zeros((), dtype=dtype, device=DEV), go).contiguous(memory_format=CL)
    out = ops().bn_add_act_backward(go, z, scale, shift, res, rs, rsh, relu)
    exp = ref.bn_add_act_backward(d64(go), d64(z), d64(scale), d64(shift), d64(res), d64(rs), d64(rsh), relu)
    own = ref.bn_add_act_backward(go, z, scale, shift, res, rs, rsh, relu)  # torch in `dtype`
    names = ["grad_z", "grad_scale", "grad_shift", "grad_residual", "grad_res_scale"]
    acc = ref.acc_dtype(dtype)
    for name, a, e, o in zip(names, out, exp, own, strict=True):
        assert tuple(a.shape) == tuple(o.shape), f"{name}: shape {tuple(a.shape)} != {tuple(o.shape)}"
        assert a.dtype == o.dtype and a.device == z.device, f"{name}: {a.dtype} on {a.device}"
        if a.dim() == 4:
            assert_nhwc(a, name)
        assert_rule(a, e, dtype if a.dtype == dtype else acc, o, f"bn_add_act_backward {shape} {variant} {name}")
    if res is None:
        assert out[3].numel() == 0 and out[4].numel() == 0
    elif rs is None:
        assert out[4].numel() == 0


# ---------------------------------------------------------------------------------------
# stats_backward, bn_finalize, bn_update_running_stats


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8, 64, 56, 56), (8, 2048, 7, 7), (1, 5, 3, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_stats_backward(shape, dtype, offset):
    z = rand(*shape, dtype=dtype, offset=offset)
    count = shape[0] * shape[2] * shape[3]
    acc = ref.acc_dtype(dtype)
    stats = stats_of(d64(z)).to(acc)
    grad_z = rand(*shape, dtype=dtype)
    grad_stats = torch.randn(2, shape[1], dtype=torch.float64, device=DEV).to(acc)
    g = ops().stats_backward(grad_z, grad_stats, z, stats, count)
    assert_nhwc(g)
    exp = ref.stats_backward(d64(grad_z), d64(grad_stats), d64(z), d64(stats), count)
    own = ref.stats_backward(grad_z, grad_stats, z, stats, count)
    assert_rule(g, exp, dtype, own, f"stats_backward {shape}")


@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("k", [1, 64, 2048, 1000])
def test_bn_finalize(acc, affine, k):
    count = 8 * 7 * 7
    mean = torch.randn(k, dtype=torch.float64, device=DEV) * 5
    m2 = torch.rand(k, dtype=torch.float64, device=DEV) * count * 3 + 1e-3
    stats = torch.stack([mean, m2]).to(acc)
    gamma = vec(k, acc) if affine else None
    beta = vec(k, acc) if affine else None
    out = ops().bn_finalize(stats, count, gamma, beta, 1e-5)
    exp = ref.bn_finalize(d64(stats), count, d64(gamma), d64(beta), 1e-5)
    own = ref.bn_finalize(stats, count, gamma, beta, 1e-5)
    for name, a, e, o in zip(["scale", "shift", "save_mean", "save_invstd"], out, exp, own, strict=True):
        assert a.dtype == acc and a.shape == (k,)
        assert_rule(a, e, acc, o, f"bn_finalize {name}")
    # Outputs must not alias the inputs (the reference's save_mean is a view of stats).
    assert out[2].data_ptr() != stats.data_ptr()


@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("present", ["all", "scale_shift", "none_gamma"])
@pytest.mark.parametrize("k", [1, 64, 2048, 1000])
def test_bn_finalize_backward_matches_the_cpu_kernel(acc, present, k):
    """Both compute in double and round once: equal up to the GPU's FMA contractions."""
    count = 8 * 7 * 7
    stats = torch.stack([torch.randn(k, dtype=torch.float64) * 5,
                         torch.rand(k, dtype=torch.float64) * count * 3 + 1e-3]).to(acc)
    gamma = None if present == "none_gamma" else torch.rand(k, dtype=acc) + 0.5
    scale, _, mean, invstd = ops().bn_finalize(stats, count, gamma, None, 1e-5)
    grads = [torch.randn(k, dtype=acc) for _ in range(4)]
    if present != "all":
        grads[2] = grads[3] = None
    args = [*grads, gamma, scale, mean, invstd]
    want = ops().bn_finalize_backward(*args, count)
    got = ops().bn_finalize_backward(*[None if t is None else t.to(DEV) for t in args], count)
    tol = dict(rtol=1e-6, atol=1e-6) if acc == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, **tol)


@pytest.mark.parametrize("running_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum,with_nbt", [(0.1, True), (None, True), (0.3, False), (1.0, True)])
def test_bn_update_running_stats(running_dtype, acc, momentum, with_nbt):
    k, count = 96, 8 * 14 * 14
    stats = torch.stack([torch.randn(k, dtype=torch.float64, device=DEV),
                         torch.rand(k, dtype=torch.float64, device=DEV) * count]).to(acc)
    rm = torch.randn(k, device=DEV).to(running_dtype)
    rv = torch.rand(k, device=DEV).to(running_dtype) + 0.5
    nbt = torch.tensor(7, dtype=torch.int64, device=DEV) if with_nbt else None
    rm_e, rv_e = rm.clone(), rv.clone()
    nbt_e = None if nbt is None else nbt.clone()
    ref.bn_update_running_stats(stats, count, rm_e, rv_e, nbt_e, momentum)  # same dtypes
    ops().bn_update_running_stats(stats, count, rm, rv, nbt, momentum)
    if with_nbt:
        assert nbt.item() == 8
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[running_dtype]
    torch.testing.assert_close(rm, rm_e, rtol=tol, atol=tol)
    torch.testing.assert_close(rv, rv_e, rtol=tol, atol=tol)


def test_bn_update_running_stats_strided_buffers():
    k = 32
    stats = torch.stack([torch.randn(k, device=DEV), torch.rand(k, device=DEV) * 100])
    rm_base = torch.randn(2 * k, device=DEV)
    rv_base = torch.rand(2 * k, device=DEV)
    rm, rv = rm_base[::2], rv_base[::2]
    rm_e, rv_e = rm.clone(), rv.clone()
    ref.bn_update_running_stats(stats, 100, rm_e, rv_e, None, 0.1)
    ops().bn_update_running_stats(stats, 100, rm, rv, None, 0.1)
    torch.testing.assert_close(rm_base[::2], rm_e)
    torch.testing.assert_close(rv_base[::2], rv_e)


# ---------------------------------------------------------------------------------------
# determinism, empty batches, CUDA graphs, bad input


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype):
    case = Conv(8, 64, 56, 56, 64)
    x, w = conv_inputs(case, dtype)
    in_scale, in_shift = vec(case.c, dtype, positive=True), vec(case.c, dtype)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        z1, s1 = ops().conv_stats(x, w, in_scale, in_shift, True, *case.args)
        z2, s2 = ops().conv_stats(x, w, in_scale, in_shift, True, *case.args)
    assert torch.equal(z1, z2)
    assert torch.equal(s1, s2), "conv_stats statistics differ between identical runs"
    zz, scale, shift, res, rs, rsh = _bn_inputs((8, 256, 28, 28), dtype, "dual")
    go = rand(8, 256, 28, 28, dtype=dtype)
    b1 = ops().bn_add_act_backward(go, zz, scale, shift, res, rs, rsh, True)
    b2 = ops().bn_add_act_backward(go, zz, scale, shift, res, rs, rsh, True)
    for a, b in zip(b1, b2, strict=True):
        assert a.shape == b.shape and torch.equal(a, b), "bn_add_act_backward differs between identical runs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(dtype):
    case = Conv(0, 64, 14, 14, 32)
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    y = ops().conv_bn_act(x, w, scale, shift, None, *case.args, True)
    assert y.shape == (0, 32, 14, 14) and y.dtype == dtype and y.is_cuda
    z, stats = ops().conv_stats(x, w, vec(64, dtype), vec(64, dtype), True, *case.args)
    assert z.shape == (0, 32, 14, 14) and z.is_cuda
    _, estats = ref.conv_stats(d64(x), d64(w), None, None, False, *case.args)
    assert stats.shape == (2, 32) and stats.dtype == ref.acc_dtype(dtype)
    assert torch.isnan(stats[0]).all() and torch.isnan(estats[0]).all()
    assert (stats[1] == 0).all() and (estats[1] == 0).all()
    zz = torch.empty(0, 32, 14, 14, dtype=dtype, device=DEV).contiguous(memory_format=CL)
    y2 = ops().bn_add_act(zz, scale, shift, zz, scale, shift, True)
    assert y2.shape == zz.shape
    gz, gsc, gsh, gr, grs = ops().bn_add_act_backward(zz, zz, scale, shift, zz, scale, shift, True)
    assert gz.shape == zz.shape and gr.shape == zz.shape
    assert (gsc == 0).all() and (gsh == 0).all() and (grs == 0).all() and gsc.shape == (32,)
    gz2, _, _, gr2, grs2 = ops().bn_add_act_backward(zz, zz, scale, shift, None, None, None, False)
    assert gr2.numel() == 0 and grs2.numel() == 0 and gr2.dtype == dtype and grs2.dtype == scale.dtype
    g = ops().stats_backward(zz, stats.nan_to_num(), zz, stats.nan_to_num(), 0)
    assert g.shape == zz.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_cuda_graph_conv_bn_act(dtype):
    case = Conv(8, 64, 28, 28, 64)
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype)
    graph, y = capture(lambda: ops().conv_bn_act(x, w, scale, shift, res, *case.args, True))
    for _ in range(2):
        x.copy_(rand(*x.shape, dtype=dtype))
        res.copy_(rand(*res.shape, dtype=dtype))
        graph.replay()
        torch.cuda.synchronize()
        expected = ops().conv_bn_act(x, w, scale, shift, res, *case.args, True)
        torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_cuda_graph_training_step(momentum):
    """conv_stats + bn_update_running_stats captured once, replayed: no host sync inside."""
    dtype = torch.float16
    case = Conv(8, 64, 28, 28, 64)
    x, w = conv_inputs(case, dtype)
    in_scale, in_shift = vec(case.c, dtype, positive=True), vec(case.c, dtype)
    count = case.n * case.out_hw()[0] * case.out_hw()[1]
    rm = torch.zeros(case.k, device=DEV)
    rv = torch.ones(case.k, device=DEV)
    nbt = torch.zeros((), dtype=torch.int64, device=DEV)

    def step():
        z, stats = ops().conv_stats(x, w, in_scale, in_shift, True, *case.args)
        ops().bn_update_running_stats(stats, count, rm, rv, nbt, momentum)
        return z, stats

    graph, (z, stats) = capture(step)
    # the warm-up and the capture itself may have run the update: restart from known values
    rm.zero_()
    rv.fill_(1.0)
    nbt.zero_()
    rm_e, rv_e, nbt_e = rm.clone(), rv.clone(), nbt.clone()
    for _ in range(3):
        x.copy_(rand(*x.shape, dtype=dtype))
        graph.replay()
        torch.cuda.synchronize()
        z_e, stats_e = ops().conv_stats(x, w, in_scale, in_shift, True, *case.args)
        torch.testing.assert_close(z, z_e)
        torch.testing.assert_close(stats, stats_e)
        ref.bn_update_running_stats(stats_e, count, rm_e, rv_e, nbt_e, momentum)
    assert nbt.item() == 3
    torch.testing.assert_close(rm, rm_e)
    torch.testing.assert_close(rv, rv_e)


def test_bad_input_names_the_argument():
    case = Conv(2, 8, 6, 6, 16)
    x, w = conv_inputs(case, torch.float32)
    scale, shift = vec(16, torch.float32), vec(16, torch.float32)
    with pytest.raises(RuntimeError, match="scale"):
        ops().conv_bn_act(x, w, scale.cpu(), shift, None, *case.args, True)
    with pytest.raises(RuntimeError, match="shift"):
        ops().conv_bn_act(x, w, scale, shift.half(), None, *case.args, True)
    with pytest.raises(RuntimeError, match="residual"):
        ops().conv_bn_act(x, w, scale, shift, rand(2, 16, 5, 5, dtype=torch.float32), *case.args, True)
    with pytest.raises(RuntimeError, match="in_scale"):
        ops().conv_stats(x, w, vec(16, torch.float32), None, False, *case.args)
    with pytest.raises(RuntimeError, match="x"):
        ops().conv_bn_act(x.cpu(), w, scale, shift, None, *case.args, True)
    z = rand(2, 16, 6, 6, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="res_scale"):
        ops().bn_add_act(z, scale, shift, z, scale.cpu(), None, True)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops().bn_add_act_backward(z.half(), z, scale, shift, None, None, None, True)
    stats = torch.stack([scale, shift.abs()])
    with pytest.raises(RuntimeError, match="gamma"):
        ops().bn_finalize(stats, 72, scale.cpu(), None, 1e-5)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        ops().bn_update_running_stats(stats, 72, scale.clone(), shift.abs(), None, None)
    with pytest.raises(RuntimeError, match="grad_stats"):
        ops().stats_backward(z, stats.double(), z, stats, 72)
