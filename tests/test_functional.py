"""fused_resnet.functional on every CPU backend against the float64 reference: outputs and
gradients, real ResNet shapes and odd ones, all dtypes the backend supports."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_CASES, RESNET_CASES, ConvCase, assert_matches, conv_inputs, f64, rand, requires_c, vec

from fused_resnet import _ext, backends
from fused_resnet import functional as FF
from fused_resnet import reference as ref

BACKENDS = ["torch", pytest.param("cpu", marks=requires_c)]
LOWP = [torch.bfloat16, torch.float16]


def _pairs(case):
    return dict(stride=(case.stride,) * 2, padding=(case.padding,) * 2, dilation=(case.dilation,) * 2,
                groups=case.groups)


def _ref_conv_bn_act(x, w, s, b, r, case, relu, dtype=None):
    cast = (lambda t: None if t is None else t.to(dtype)) if dtype else f64
    vcast = (lambda t: t.float()) if dtype else f64
    return ref.conv_bn_act(cast(x), cast(w), vcast(s), vcast(b), cast(r), relu=relu, **_pairs(case))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False)])
def test_conv_bn_act_forward(backend, case, residual, relu):
    x, w, s, b, r = conv_inputs(case, torch.float32, residual=residual)
    y = FF.conv_bn_act(x, w, s, b, r, relu=relu, backend=backend, **case.conv_args)
    assert backends.last_decision("conv_bn_act").backend == backend
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, _ref_conv_bn_act(x, w, s, b, r, case, relu), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, *LOWP])
@pytest.mark.parametrize("case", RESNET_CASES[:3] + [ConvCase(1, 5, 7, 9, 7)], ids=str)
def test_conv_bn_act_dtypes(backend, dtype, case):
    x, w, s, b, r = conv_inputs(case, dtype, residual=True)
    y = FF.conv_bn_act(x, w, s, b, r, backend=backend, **case.conv_args)
    assert y.dtype == dtype
    lowp = _ref_conv_bn_act(x, w, s, b, r, case, True, dtype) if dtype in LOWP else None
    assert_matches(y, _ref_conv_bn_act(x, w, s, b, r, case, True), dtype, lowp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
@pytest.mark.parametrize("prologue", ["none", "bn_relu", "scale_only", "shift_only", "relu_only"])
def test_conv_stats_forward(backend, case, prologue):
    x, w, _, _, _ = conv_inputs(case, torch.float32)
    s = vec(case.c, positive=True) if prologue in ("bn_relu", "scale_only") else None
    b = vec(case.c) if prologue in ("bn_relu", "shift_only") else None
    relu = prologue in ("bn_relu", "relu_only")
    z, stats = FF.conv_stats(x, w, s, b, relu, backend=backend, **case.conv_args)
    ez, estats = ref.conv_stats(f64(x), f64(w), f64(s), f64(b), relu, **_pairs(case))
    assert z.is_contiguous(memory_format=torch.channels_last) and stats.shape == (2, case.k)
    assert stats.dtype == torch.float32
    assert_matches(z, ez, torch.float32, what="z")
    assert_matches(stats[0], estats[0], torch.float32, what="mean")
    assert_matches(stats[1], estats[1], torch.float32, what="M2")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, *LOWP])
def test_conv_stats_dtypes(backend, dtype):
    case = ConvCase(2, 16, 9, 9, 24, stride=2)
    x, w, _, _, _ = conv_inputs(case, dtype)
    s, b = vec(16, dtype, positive=True), vec(16, dtype)
    z, stats = FF.conv_stats(x, w, s, b, True, backend=backend, **case.conv_args)
    assert z.dtype == dtype and stats.dtype == ref.acc_dtype(dtype)
    ez, estats = ref.conv_stats(f64(x), f64(w), f64(s), f64(b), True, **_pairs(case))
    lz, lstats = ref.conv_stats(x, w, s, b, True, **_pairs(case)) if dtype in LOWP else (None, None)
    assert_matches(z, ez, dtype, lz, what="z")
    for row in range(2):
        assert_matches(stats[row], estats[row], dtype, None if lstats is None else lstats[row], what=f"stats[{row}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_stats_large_mean(backend):
    """Variance stays accurate when |mean| >> std: the output is offset by ~1000 via the prologue."""
    case = ConvCase(4, 8, 12, 12, 8, 1, 1, padding=0)
    x, _, _, _, _ = conv_inputs(case)
    w = torch.eye(8).view(8, 8, 1, 1).contiguous()
    shift = torch.full((8,), 1000.0)
    z, stats = FF.conv_stats(x, w, None, shift, False, backend=backend)
    expected = (x.double() + 1000.0).var((0, 2, 3), unbiased=False) * (z.numel() // 8)
    torch.testing.assert_close(stats[1].double(), expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["plain", "residual", "dual", "res_scale_only", "res_shift_only", "no_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bn_add_act(backend, mode, dtype):
    z = rand(3, 13, 5, 6, dtype=dtype)
    r = rand(3, 13, 5, 6, dtype=dtype) if mode != "plain" else None
    rs = vec(13, dtype) if mode in ("dual", "res_scale_only") else None
    rb = vec(13, dtype) if mode in ("dual", "res_shift_only") else None
    s, b = vec(13, dtype), vec(13, dtype)
    relu = mode != "no_relu"
    y = FF.bn_add_act(z, s, b, r, rs, rb, relu, backend=backend)
    e = ref.bn_add_act(f64(z), f64(s), f64(b), f64(r), f64(rs), f64(rb), relu)
    low = ref.bn_add_act(z, s, b, r, rs, rb, relu) if dtype == torch.bfloat16 else None
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, e, dtype, low)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_finalize_matches_batchnorm(backend, momentum, affine):
    case = ConvCase(4, 6, 9, 9, 10, stride=2)
    x, w, _, _, _ = conv_inputs(case)
    bn = torch.nn.BatchNorm2d(10, momentum=momentum, affine=affine).train()
    if affine:
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(3):
        z, stats = FF.conv_stats(x, w, backend=backend, **case.conv_args)
        expected = bn(z)
        count = z.numel() // 10
        s, b, mean, invstd = FF.bn_finalize(stats, count, bn.weight, bn.bias, rm, rv, nbt, momentum, bn.eps,
                                            backend=backend)
        y = FF.bn_add_act(z, s, b, relu=False, backend=backend)
        torch.testing.assert_close(y, expected.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)
    assert nbt.item() == 3
    torch.testing.assert_close(mean, z.double().mean((0, 2, 3)).float(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- gradients


def _grads(out, inputs, grad):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, wanted, grad)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", RESNET_CASES[1:3] + [ConvCase(1, 5, 7, 9, 7), ConvCase(2, 12, 9, 7, 6, stride=2,
                                                                                         padding=0, groups=3)], ids=str)
@pytest.mark.parametrize("residual", [False, True])
def test_conv_bn_act_backward(backend, case, residual):
    x, w, s, b, r = conv_inputs(case, residual=residual)
    inputs = [t.requires_grad_(True) if t is not None else None for t in (x, w, s, b, r)]
    y = FF.conv_bn_act(*inputs, backend=backend, **case.conv_args)
    g = rand(*y.shape)
    got = _grads(y, inputs, g)
    inputs64 = [None if t is None else f64(t).requires_grad_(True) for t in inputs]
    e = ref.conv_bn_act(*inputs64, **_pairs(case), relu=True)
    exp = _grads(e, inputs64, f64(g))
    for name, a, b_ in zip(["x", "weight", "scale", "shift", "residual"], got, exp, strict=False):
        assert_matches(a, b_, torch.float32, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [ConvCase(2, 16, 8, 8, 16), ConvCase(2, 8, 9, 9, 24, 1, 1, stride=2, padding=0),
                                  ConvCase(1, 6, 5, 5, 6, groups=3, dilation=2, padding=2)], ids=str)
@pytest.mark.parametrize("prologue", [False, True])
def test_training_chain_backward(backend, case, prologue):
    """conv_stats (with prologue) -> bn_finalize -> bn_add_act: every gradient vs the reference."""
    x, w, _, _, r = conv_inputs(case, residual=True)
    gamma, beta = vec(case.k, positive=True), vec(case.k)
    s_in = vec(case.c, positive=True) if prologue else None
    b_in = vec(case.c) if prologue else None
    leaves = [t.requires_grad_(True) if t is not None else None for t in (x, w, gamma, beta, r, s_in, b_in)]

    def run(impl, x, w, gamma, beta, r, s_in, b_in, **kw):
        z, stats = impl.conv_stats(x, w, s_in, b_in, prologue, **case.conv_args, **kw)
        count = z.numel() // case.k
        s, b, _, _ = impl.bn_finalize(stats, count, gamma, beta, eps=1e-5, **kw)
        return impl.bn_add_act(z, s, b, r, relu=True, **kw)

    y = run(FF, *leaves, backend=backend)
    g = rand(*y.shape)
    got = _grads(y, leaves, g)
    leaves64 = [None if t is None else f64(t).requires_grad_(True) for t in leaves]

    class Ref:  # the reference with the functional signature used above
        conv_stats = staticmethod(lambda x, w, s, b, relu, **c: ref.conv_stats(
            x, w, s, b, relu, (c["stride"],) * 2, (c["padding"],) * 2, (c["dilation"],) * 2, c["groups"]))
        bn_finalize = staticmethod(lambda st, n, g_, b_, eps: ref.bn_finalize(st, n, g_, b_, eps))
        bn_add_act = staticmethod(lambda z, s, b, r, relu: ref.bn_add_act(z, s, b, r, relu=relu))

    exp = _grads(run(Ref, *leaves64), leaves64, f64(g))
    names = [n for n, t in zip(["x", "w", "gamma", "beta", "residual", "in_scale", "in_shift"], leaves, strict=True)
             if t is not None]
    for name, a, e in zip(names, got, exp, strict=True):
        # Batch-norm gradients subtract nearly equal terms; allow float32 a little more room.
        err = (a.double() - e).abs().max().item()
        assert err <= 2e-4 * max(e.abs().max().item(), 1.0), f"grad {name}: error {err:.3e}"


def test_grad_flows_without_relu_and_with_dual_bn():
    z = rand(2, 4, 3, 3).requires_grad_(True)
    r = rand(2, 4, 3, 3).requires_grad_(True)
    s, b, rs, rb = (vec(4).requires_grad_(True) for _ in range(4))
    backend = "cpu" if _ext.available() else "torch"
    y = FF.bn_add_act(z, s, b, r, rs, rb, relu=False, backend=backend)
    grads = torch.autograd.grad(y.sum(), (z, s, b, r, rs, rb))
    torch.testing.assert_close(grads[0], s.detach().view(1, -1, 1, 1).expand_as(z).contiguous())
    torch.testing.assert_close(grads[5], torch.full((4,), 18.0))
