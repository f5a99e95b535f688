"""The Triton backend (fused_resnet/triton) on a GPU, op by op, against the executable spec.

Every op is called through ``torch.ops.fused_resnet_triton.*`` (or the functional API with
``backend="triton"``) and compared with :mod:`fused_resnet.reference` on float64 copies of the
same random inputs, by the design's rule: the error against the float64 reference may be at most
2x the error of PyTorch's own eager computation in the same dtype (F.conv2d / BatchNorm math /
add / relu, each rounded to that dtype as an eager model would), plus a small floor scaled by
the output's magnitude. TF32 is off (so float32 is held to float32 accuracy) except in the test
that checks the TF32 path against cuDNN's own TF32 convolution.

Shapes: real ResNet-50 layers at batch 4 (stem 7x7/s2, 3x3, 1x1 s1 -- the plain-GEMM path --,
1x1 s2, conv5 reduce), ResNeXt grouped 3x3 (32x4d, 32x8d, 64x4d), dilation, and odd ones
(batch 1, H = W = 1, odd channel counts). Also: |mean| >> std statistics, bitwise determinism,
empty batches, int64 addressing past 2^31 elements, CUDA graph capture, a training block's
gradients through the functional API, torch.compile(fullgraph=True) with Inductor, and the
persistent autotuning cache (a second process does not re-tune).

Skips without CUDA or without triton.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gpu_common import (  # noqa: F401  (no_tf32_seeded: an autouse fixture)
    CL,
    DEV,
    Conv,
    assert_nhwc,
    assert_rule,
    capture,
    check_conv_bn_act,
    check_conv_stats,
    conv_inputs,
    d64,
    eager_bn,
    eager_conv_bn_act,
    rand,
    stats_of,
    vec,
)

from fused_resnet import reference as ref
from fused_resnet.triton import triton_import_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(triton_import_error() is not None, reason="triton does not import"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROOT = Path(__file__).resolve().parents[2]


def T():
    from fused_resnet.triton import load_ops

    return load_ops()


# Inputs, eager baselines and the 2x rule: gpu_common.py; TF32 off + seeding: its no_tf32_seeded fixture.

RESNET50 = [
    Conv(4, 3, 224, 224, 64, r=7, stride=2, padding=3),  # stem
    Conv(4, 64, 56, 56, 64),  # conv2_x 3x3
    Conv(4, 64, 56, 56, 256, r=1, padding=0),  # conv2_x 1x1 expand: plain GEMM path
    Conv(4, 128, 56, 56, 128, stride=2),  # conv3_1 3x3 stride 2 (torchvision v1.5)
    Conv(4, 256, 56, 56, 512, r=1, stride=2, padding=0),  # projection shortcut 1x1 s2
    Conv(4, 1024, 14, 14, 256, r=1, padding=0),  # conv5 entry 1x1 reduce
    Conv(4, 512, 7, 7, 512),  # conv5_x 3x3
]
GROUPED = [
    Conv(4, 128, 56, 56, 128, groups=32),  # ResNeXt-50 32x4d conv2_x
    Conv(4, 256, 56, 56, 256, groups=32),  # ResNeXt-101 32x8d conv2_x
    Conv(4, 256, 56, 56, 256, groups=64),  # ResNeXt-101 64x4d conv2_x
    Conv(4, 512, 28, 28, 512, stride=2, groups=32),  # 32x4d conv4 entry, stride 2
]
ODD = [
    Conv(1, 64, 1, 1, 10, r=1, padding=0),  # batch 1, H = W = 1
    Conv(2, 5, 9, 7, 7),  # odd channels, non-square
    Conv(2, 256, 28, 28, 256, padding=2, dilation=2),  # dilated 3x3 (DeepLab-style ResNet)
    Conv(2, 32, 15, 15, 36, stride=2),  # stride 2, odd spatial, channels not a tile multiple
]
CASES = RESNET50 + GROUPED + ODD


# ---------------------------------------------------------------------------------------
# convolution


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)], ids=["res-relu", "plain"])
def test_conv_bn_act(case, dtype, residual, relu):
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, positive=True), vec(case.k)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype) if residual else None
    y = T().conv_bn_act(x, w, scale, shift, res, *case.args, relu)
    check_conv_bn_act(y, x, w, scale, shift, res, case, dtype, relu, f"conv_bn_act {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("prologue", ["none", "bn-relu"])
def test_conv_stats(case, dtype, prologue):
    x, w = conv_inputs(case, dtype)
    in_scale = vec(case.c, positive=True) if prologue != "none" else None
    in_shift = vec(case.c) if prologue != "none" else None
    in_relu = prologue != "none"
    z, stats = T().conv_stats(x, w, in_scale, in_shift, in_relu, *case.args)
    check_conv_stats(z, stats, x, w, in_scale, in_shift, in_relu, case, dtype, f"conv_stats {case} {prologue}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [Conv(1, 512, 7, 7, 512), Conv(1, 1024, 14, 14, 2048, r=1, stride=2, padding=0),
                                  Conv(1, 256, 7, 7, 256, groups=32)], ids=str)
def test_split_k_at_batch_1(case, dtype, monkeypatch):
    """Small M: the launcher splits the reduction (64x64 tiles would leave SMs idle); the split
    result holds the same rule, for both epilogues, and the two launches really ran."""
    from conftest import spy_triton_launches

    from fused_resnet.triton import conv

    launched = spy_triton_launches(monkeypatch)
    x, w = conv_inputs(case, dtype)
    scale, shift = vec(case.k, positive=True), vec(case.k)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype)
    y = T().conv_bn_act(x, w, scale, shift, res, *case.args, True)
    check_conv_bn_act(y, x, w, scale, shift, res, case, dtype, True, f"split-K conv_bn_act {case}")
    seen = [(k, kw.get("SPLIT_K")) for k, kw in launched]
    assert seen[0][0] is conv.conv_kernel and seen[0][1] > 1, seen
    assert seen[1] == (conv.splitk_epilogue_kernel, seen[0][1]), seen
    in_scale, in_shift = vec(case.c, positive=True), vec(case.c)
    z, stats = T().conv_stats(x, w, in_scale, in_shift, True, *case.args)
    check_conv_stats(z, stats, x, w, in_scale, in_shift, True, case, dtype, f"split-K conv_stats {case}")
    seen = [(k, kw.get("SPLIT_K")) for k, kw in launched]
    split = seen[0][1]
    assert seen[2:] == [(conv.conv_kernel, split), (conv.splitk_epilogue_kernel, split),
                        (conv.stats_reduce_kernel, None)], seen


@pytest.mark.parametrize("case", [RESNET50[1], RESNET50[2], GROUPED[0]], ids=str)
def test_tf32_follows_cudnn_flag(case):
    """allow_tf32 (PyTorch's default for convolutions): TF32 tensor cores, held to 2x cuDNN's own
    TF32 error; with the flag off the result is float32-accurate (the other tests)."""
    torch.backends.cudnn.allow_tf32 = True
    x, w = conv_inputs(case, torch.float32)
    scale, shift = vec(case.k, positive=True), vec(case.k)
    y = T().conv_bn_act(x, w, scale, shift, None, *case.args, False)
    expected = ref.conv_bn_act(d64(x), d64(w), d64(scale), d64(shift), None, *case.args, relu=False)
    eager = eager_conv_bn_act(x, w, scale, shift, None, case, False)  # cuDNN with TF32
    assert_rule(y, expected, torch.float32, eager, f"tf32 {case}")


@pytest.mark.parametrize("dtype,offset,spread", [(torch.float32, 1e3, 1.0), (torch.float32, -2e4, 3.0),
                                                 (torch.float32, 5e2, 0.05), (torch.float16, 60.0, 8.0),
                                                 (torch.bfloat16, -60.0, 8.0)], ids=str)
def test_conv_stats_large_mean(dtype, offset, spread):
    n, c, h, wd, k = 8, 64, 28, 28, 48
    x = rand(n, c, h, wd, dtype=dtype, scale=spread, offset=offset)
    w = (torch.full((k, c, 1, 1), 1.0 / c, dtype=torch.float64, device=DEV)
         * (1 + 0.01 * torch.randn(k, 1, 1, 1, dtype=torch.float64, device=DEV))).to(dtype)
    z, stats = T().conv_stats(x, w.contiguous(memory_format=CL), None, None, False, [1, 1], [0, 0], [1, 1], 1)
    own = stats_of(d64(z))
    std = (own[1] / (n * h * wd)).sqrt()
    assert (std > 0).all() and (own[0].abs() > 10 * std).all(), "not a large-mean case"
    mean_err = ((d64(stats[0]) - own[0]).abs() / own[0].abs()).max().item()
    m2_rel = ((d64(stats[1]) - own[1]).abs() / own[1]).max().item()
    assert mean_err <= 1e-6, f"mean relative error {mean_err:.3e}"
    assert m2_rel <= 3e-5, f"M2 relative error {m2_rel:.3e}"


def test_int64_offsets_past_2_pow_31():
    """x and the output each hold more than 2^31 elements: the last image's addresses need int64."""
    free, _ = torch.cuda.mem_get_info()
    c = k = 64
    hw = 112
    n = 2**31 // (c * hw * hw) + 2
    need = 2 * n * c * hw * hw * 2 * 1.2  # x and out in float16, plus slack
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    x = torch.empty((n, c, hw, hw), dtype=torch.float16, device=DEV, memory_format=CL)
    x[-2:].copy_(rand(2, c, hw, hw, dtype=torch.float16))
    x[:-2].fill_(1.0)
    w = rand(k, c, 1, 1, dtype=torch.float16, scale=0.125)
    scale, shift = vec(k, positive=True), vec(k)
    y = T().conv_bn_act(x, w, scale, shift, None, [1, 1], [0, 0], [1, 1], 1, True)
    assert x.numel() > 2**31 and y.numel() > 2**31
    tail = y[-2:]
    expected = ref.conv_bn_act(d64(x[-2:]), d64(w), d64(scale), d64(shift), None, (1, 1), (0, 0), (1, 1), 1, True)
    eager = torch.relu(eager_bn(F.conv2d(x[-2:], w), scale, shift))
    assert_rule(tail, expected, torch.float16, eager, "last images past 2^31")
    del y
    out = T().bn_add_act(x, scale[:c], shift[:c], None, None, None, False)
    assert_rule(out[-2:], ref.bn_add_act(d64(x[-2:]), d64(scale), d64(shift), relu=False), torch.float16,
                eager_bn(x[-2:], scale, shift), "bn_add_act past 2^31")


# ---------------------------------------------------------------------------------------
# BatchNorm ops

DUAL = {"none": (False, False, False), "res": (True, False, False), "dual": (True, True, True),
        "res-scale": (True, True, False)}
ACT_SHAPES = [(4, 256, 56, 56), (4, 2048, 7, 7), (1, 7, 5, 3), (3, 64, 1, 1)]


def _bn_inputs(shape, dtype, variant):
    has_res, has_rs, has_rsh = DUAL[variant]
    k = shape[1]
    z = rand(*shape, dtype=dtype)
    res = rand(*shape, dtype=dtype) if has_res else None
    return (z, vec(k, positive=True), vec(k), res, vec(k, positive=True) if has_rs else None,
            vec(k) if has_rsh else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", list(DUAL))
def test_bn_add_act_and_backward(shape, dtype, variant):
    z, scale, shift, res, rs, rsh = _bn_inputs(shape, dtype, variant)
    y = T().bn_add_act(z, scale, shift, res, rs, rsh, True)
    assert_nhwc(y)
    exp = ref.bn_add_act(d64(z), d64(scale), d64(shift), d64(res), d64(rs), d64(rsh), True)
    eager = eager_bn(z, scale, shift)
    if res is not None:
        r = res if rs is None and rsh is None else ref.bn_add_act(res, rs if rs is not None else torch.ones_like(scale),
                                                               rsh if rsh is not None else torch.zeros_like(scale),
                                                               relu=False)
        eager = eager + r
    assert_rule(y, exp, dtype, torch.relu(eager), f"bn_add_act {shape} {variant}")

    pre = ref.bn_add_act(d64(z), d64(scale), d64(shift), d64(res), d64(rs), d64(rsh), relu=False)
    go = rand(*shape, dtype=dtype)
    # Where the pre-activation is within rounding of 0 the ReLU mask may legitimately differ.
    go = torch.where(pre.abs() < 1e-3, torch.zeros((), dtype=dtype, device=DEV), go).contiguous(memory_format=CL)
    out = T().bn_add_act_backward(go, z, scale, shift, res, rs, rsh, True)
    exp = ref.bn_add_act_backward(d64(go), d64(z), d64(scale), d64(shift), d64(res), d64(rs), d64(rsh), True)
    own = ref.bn_add_act_backward(go, z, scale, shift, res, rs, rsh, True)
    names = ["grad_z", "grad_scale", "grad_shift", "grad_residual", "grad_res_scale"]
    for name, a, e, o in zip(names, out, exp, own, strict=True):
        assert tuple(a.shape) == tuple(o.shape) and a.dtype == o.dtype, name
        if a.dim() == 4:
            assert_nhwc(a, name)
        assert_rule(a, e, dtype if a.dtype == dtype else torch.float32, o, f"backward {shape} {variant} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 64, 56, 56), (4, 2048, 7, 7), (1, 5, 3, 3)], ids=lambda s: "x".join(map(str, s)))
def test_stats_backward(shape, dtype):
    z = rand(*shape, dtype=dtype, offset=3.0)
    count = shape[0] * shape[2] * shape[3]
    stats = stats_of(d64(z)).float()
    grad_z = rand(*shape, dtype=dtype)
    grad_stats = torch.randn(2, shape[1], device=DEV)
    g = T().stats_backward(grad_z, grad_stats, z, stats, count)
    assert_nhwc(g)
    exp = ref.stats_backward(d64(grad_z), d64(grad_stats), d64(z), d64(stats), count)
    own = ref.stats_backward(grad_z, grad_stats, z, stats, count)
    assert_rule(g, exp, dtype, own, f"stats_backward {shape}")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("k", [1, 64, 2048, 1000])
def test_bn_finalize(affine, k):
    count = 8 * 7 * 7
    stats = torch.stack([torch.randn(k, dtype=torch.float64, device=DEV) * 5,
                         torch.rand(k, dtype=torch.float64, device=DEV) * count * 3 + 1e-3]).float()
    gamma, beta = (vec(k), vec(k)) if affine else (None, None)
    out = T().bn_finalize(stats, count, gamma, beta, 1e-5)
    exp = ref.bn_finalize(d64(stats), count, d64(gamma), d64(beta), 1e-5)
    own = ref.bn_finalize(stats, count, gamma, beta, 1e-5)
    for name, a, e, o in zip(["scale", "shift", "save_mean", "save_invstd"], out, exp, own, strict=True):
        assert a.dtype == torch.float32 and a.shape == (k,)
        assert_rule(a, e, torch.float32, o, f"bn_finalize {name}")
    assert out[2].data_ptr() != stats.data_ptr()


@pytest.mark.parametrize("running_dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("momentum,with_nbt", [(0.1, True), (None, True), (0.3, False)])
def test_bn_update_running_stats(running_dtype, momentum, with_nbt):
    k, count = 96, 8 * 14 * 14
    stats = torch.stack([torch.randn(k, device=DEV), torch.rand(k, device=DEV) * count])
    rm = torch.randn(k, device=DEV).to(running_dtype)
    rv = (torch.rand(k, device=DEV) + 0.5).to(running_dtype)
    nbt = torch.tensor(7, dtype=torch.int64, device=DEV) if with_nbt else None
    rm_e, rv_e = rm.clone(), rv.clone()
    nbt_e = None if nbt is None else nbt.clone()
    ref.bn_update_running_stats(stats, count, rm_e, rv_e, nbt_e, momentum)
    T().bn_update_running_stats(stats, count, rm, rv, nbt, momentum)
    if with_nbt:
        assert nbt.item() == 8
    tol = {torch.float64: 1e-6, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[running_dtype]
    torch.testing.assert_close(rm, rm_e, rtol=tol, atol=tol)
    torch.testing.assert_close(rv, rv_e, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------
# determinism, empty batch, CUDA graphs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype):
    case = RESNET50[1]
    x, w = conv_inputs(case, dtype)
    s1, h1 = vec(case.c, positive=True), vec(case.c)
    z1, st1 = T().conv_stats(x, w, s1, h1, True, *case.args)
    z2, st2 = T().conv_stats(x, w, s1, h1, True, *case.args)
    assert torch.equal(z1, z2) and torch.equal(st1, st2)
    args = _bn_inputs((4, 256, 28, 28), dtype, "dual")
    go = rand(4, 256, 28, 28, dtype=dtype)
    b1 = T().bn_add_act_backward(go, *args, True)
    b2 = T().bn_add_act_backward(go, *args, True)
    assert all(torch.equal(p, q) for p, q in zip(b1, b2, strict=True))


def test_empty_batch():
    case = Conv(0, 64, 14, 14, 32)
    x, w = conv_inputs(case, torch.float16)
    y = T().conv_bn_act(x, w, vec(32), vec(32), None, *case.args, True)
    assert y.shape == (0, 32, 14, 14)
    z, stats = T().conv_stats(x, w, vec(64), vec(64), True, *case.args)
    assert z.shape == (0, 32, 14, 14) and torch.isnan(stats[0]).all() and (stats[1] == 0).all()


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_cuda_graph_training_step(momentum):
    """conv_stats + bn_update_running_stats captured once and replayed (no host sync inside)."""
    case = Conv(8, 64, 28, 28, 64)
    x, w = conv_inputs(case, torch.float16)
    in_scale, in_shift = vec(case.c, positive=True), vec(case.c)
    count = case.n * case.out_hw()[0] * case.out_hw()[1]
    rm, rv = torch.zeros(case.k, device=DEV), torch.ones(case.k, device=DEV)
    nbt = torch.zeros((), dtype=torch.int64, device=DEV)

    def step():
        z, stats = T().conv_stats(x, w, in_scale, in_shift, True, *case.args)
        T().bn_update_running_stats(stats, count, rm, rv, nbt, momentum)
        return z, stats

    graph, (z, stats) = capture(step)
    rm.zero_()
    rv.fill_(1.0)
    nbt.zero_()
    rm_e, rv_e, nbt_e = rm.clone(), rv.clone(), nbt.clone()
    for _ in range(3):
        x.copy_(rand(*x.shape, dtype=torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        z_e, stats_e = T().conv_stats(x, w, in_scale, in_shift, True, *case.args)
        torch.testing.assert_close(z, z_e)
        torch.testing.assert_close(stats, stats_e)
        ref.bn_update_running_stats(stats_e, count, rm_e, rv_e, nbt_e, momentum)
    assert nbt.item() == 3
    torch.testing.assert_close(rm, rm_e)
    torch.testing.assert_close(rv, rv_e)


# ---------------------------------------------------------------------------------------
# autograd through the functional API, torch.compile


def _block(backend, x, w1, w2, wr, g1, b1, g2, b2, gr, br):
    """Training-mode BasicBlock with a projection shortcut, on the fused ops."""
    from fused_resnet import functional as FF

    z1, s1 = FF.conv_stats(x, w1, padding=1, backend=backend)
    sc1, sh1, _, _ = FF.bn_finalize(s1, z1.numel() // z1.shape[1], g1, b1, backend=backend)
    z2, s2 = FF.conv_stats(z1, w2, sc1, sh1, True, stride=2, padding=1, backend=backend)
    cnt = z2.numel() // z2.shape[1]
    sc2, sh2, _, _ = FF.bn_finalize(s2, cnt, g2, b2, backend=backend)
    zr, sr = FF.conv_stats(x, wr, stride=2, backend=backend)
    scr, shr, _, _ = FF.bn_finalize(sr, cnt, gr, br, backend=backend)
    return FF.bn_add_act(z2, sc2, sh2, zr, scr, shr, relu=True, backend=backend)


def _block_inputs(dtype, n=4, c=64, k=128, h=28):
    x = rand(n, c, h, h, dtype=dtype)
    ws = [rand(c, c, 3, 3, dtype=dtype, scale=0.06), rand(k, c, 3, 3, dtype=dtype, scale=0.06),
          rand(k, c, 1, 1, dtype=dtype, scale=0.2)]
    vs = [vec(c, positive=True), vec(c), vec(k, positive=True), vec(k), vec(k, positive=True), vec(k)]
    return [x, *ws, *vs]


def _grads(backend, inputs, gy, cast=None):
    leaves = [(t if cast is None else t.to(cast if t.dim() == 4 else torch.float64)).detach().requires_grad_(True)
              for t in inputs]
    y = _block(backend, *leaves)
    y.backward(gy.to(y.dtype))
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_block_gradients(dtype):
    inputs = _block_inputs(dtype)
    y0 = _block("torch", *inputs)
    gy = rand(*y0.shape, dtype=dtype)
    y, grads = _grads("triton", inputs, gy)
    y64, grads64 = _grads("torch", inputs, gy, cast=torch.float64)
    yo, grads_own = _grads("torch", inputs, gy)  # PyTorch's own composition in dtype
    assert_rule(y, y64, dtype, yo, "block output")
    names = ("x", "w1", "w2", "wr", "g1", "b1", "g2", "b2", "gr", "br")
    for name, a, e, o in zip(names, grads, grads64, grads_own, strict=True):
        assert_rule(a, e, dtype if a.dim() == 4 else torch.float32, o, f"grad {name}")


def test_torch_compile_fullgraph_inductor():
    """fullgraph=True over the functional API with backend='triton': forward and backward
    trace without graph breaks and match eager."""
    torch._dynamo.reset()
    inputs = _block_inputs(torch.float16, n=2, h=14)
    gy = rand(2, 128, 7, 7, dtype=torch.float16)
    y, grads = _grads("triton", inputs, gy)
    compiled = torch.compile(lambda *a: _block("triton", *a), fullgraph=True)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    yc = compiled(*leaves)
    yc.backward(gy)
    torch.testing.assert_close(yc, y, rtol=2e-3, atol=2e-3)
    for a, b in zip([t.grad for t in leaves], grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


_TUNE_SCRIPT = """
import torch
from fused_resnet.triton import load_ops
T = load_ops()
x = torch.randn(4, 64, 28, 28, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.float16) * 0.05
T.conv_stats(x, w, None, None, False, [1, 1], [1, 1], [1, 1], 1)
torch.cuda.synchronize()
print("done")
"""


def test_autotuning_is_cached_on_disk(tmp_path):
    import triton

    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        pytest.skip("this triton has no autotune(cache_results=...)")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_PRINT_AUTOTUNING="1",
               FUSED_RESNET_QUIET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = [subprocess.run([sys.executable, "-c", _TUNE_SCRIPT], env=env, capture_output=True, text=True,
                           timeout=600, cwd=ROOT) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0 and "done" in r.stdout, r.stdout + r.stderr
    assert "Triton autotuning for function conv_kernel" in runs[0].stdout, runs[0].stdout
    assert "Triton autotuning for function conv_kernel" not in runs[1].stdout, runs[1].stdout


# ---------------------------------------------------------------------------------------
# autocast, the packed-weight cache, the tuning candidates


def test_autocast_bf16_casts_like_conv2d():
    """Under torch.autocast("cuda", bfloat16) float32 activations are cast as F.conv2d's are;
    per-channel vectors and statistics stay float32."""
    case = RESNET50[1]
    x, w = conv_inputs(case, torch.float32)
    scale, shift = vec(case.k, positive=True), vec(case.k)
    res = rand(case.n, case.k, *case.out_hw(), dtype=torch.float32)
    bf = torch.bfloat16
    with torch.autocast("cuda", dtype=bf):
        y = T().conv_bn_act(x, w, scale, shift, res, *case.args, True)
        z, stats = T().conv_stats(x, w, None, None, False, *case.args)
        out = T().bn_add_act(z, scale, shift, res, None, None, True)
        conv_dtype = F.conv2d(x, w, None, *case.args).dtype
    assert y.dtype == z.dtype == out.dtype == conv_dtype == bf and stats.dtype == torch.float32
    xb, wb, rb = x.to(bf), w.to(bf), res.to(bf)
    expected = ref.conv_bn_act(d64(xb), d64(wb), d64(scale), d64(shift), d64(rb), *case.args, relu=True)
    assert_rule(y, expected, bf, eager_conv_bn_act(xb, wb, scale, shift, rb, case, True), "autocast conv_bn_act")


def test_packed_weight_cache_on_cuda():
    from fused_resnet.triton import _pack

    _pack.clear()
    case = RESNET50[2]
    x, w = conv_inputs(case, torch.bfloat16)
    scale, shift = vec(case.k, positive=True), vec(case.k)
    y1 = T().conv_bn_act(x, w, scale, shift, None, *case.args, False)
    T().conv_bn_act(x, w, scale, shift, None, *case.args, False)
    assert _pack.cache_info()["hits"] >= 1
    w.mul_(-1)  # in place: the next call must repack
    y2 = T().conv_bn_act(x, w, scale, shift, None, *case.args, False)
    expected = ref.conv_bn_act(d64(x), d64(w), d64(scale), d64(shift), None, *case.args, relu=False)
    assert_rule(y2, expected, torch.bfloat16, eager_conv_bn_act(x, w, scale, shift, None, case, False),
                "after w.mul_(-1)")
    assert not torch.allclose(y1, y2)


def test_cuda_graph_replay_sees_in_place_weight_updates():
    """A captured conv must repack on every replay: the weight changes between replays (an
    optimizer step), and a packed copy cached before the capture would be replayed as stale."""
    from fused_resnet.triton import _pack

    case = Conv(8, 64, 28, 28, 64)
    x, w = conv_inputs(case, torch.float16)
    scale, shift = vec(case.k, positive=True), vec(case.k)
    T().conv_bn_act(x, w, scale, shift, None, *case.args, False)  # cached before the capture
    graph, y = capture(lambda: T().conv_bn_act(x, w, scale, shift, None, *case.args, False))
    for _ in range(2):
        w.add_(rand(*w.shape, dtype=torch.float16, channels_last=False, scale=0.05))
        graph.replay()
        torch.cuda.synchronize()
        _pack.clear()
        fresh = T().conv_bn_act(x, w, scale, shift, None, *case.args, False)
        torch.testing.assert_close(y, fresh)


def test_at_most_three_tuning_candidates(monkeypatch):
    from fused_resnet.triton import _tuning, conv

    kept = []
    real = conv._prune

    def spy(configs, named_args, **kw):
        out = real(configs, named_args, **kw)
        kept.append(len(out))
        return out

    monkeypatch.setattr(conv.conv_kernel, "early_config_prune", spy)
    case = Conv(8, 256, 14, 14, 256)  # not used by the other tests: tunes here
    x, w = conv_inputs(case, torch.bfloat16)
    T().conv_bn_act(x, w, vec(case.k, positive=True), vec(case.k), None, *case.args, True)
    assert kept and all(1 <= n <= _tuning.MAX_CANDIDATES for n in kept), kept
