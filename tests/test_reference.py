"""The executable spec itself: float64 gradcheck, and agreement with PyTorch's own modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_CASES, ConvCase, conv_inputs, rand, vec
from torch.autograd import gradcheck

from fused_resnet import reference as ref

D = torch.float64


def _req(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_bn_act_gradcheck(residual, relu):
    case = ConvCase(2, 4, 5, 5, 3, stride=2)
    x, w, s, b, r = _req(*conv_inputs(case, D, residual=residual))
    fn = lambda *a: ref.conv_bn_act(*a, **{"stride": (2, 2), "padding": (1, 1)}, relu=relu)  # noqa: E731
    assert gradcheck(fn, (x, w, s, b, r))


@pytest.mark.parametrize("prologue", ["none", "scale", "shift", "both", "both_relu"])
def test_conv_stats_gradcheck(prologue):
    case = ConvCase(2, 3, 4, 4, 4, groups=1)
    x, w, _, _, _ = conv_inputs(case, D)
    s = vec(3, D, positive=True) if prologue in ("scale", "both", "both_relu") else None
    b = vec(3, D) if prologue in ("shift", "both", "both_relu") else None
    relu = prologue == "both_relu"
    x, w, s, b = _req(x, w, s, b)

    def fn(x, w, s, b):
        z, stats = ref.conv_stats(x, w, s, b, relu, padding=(1, 1))
        return z, stats

    assert gradcheck(fn, (x, w, s, b))


def test_bn_finalize_gradcheck():
    z = rand(3, 5, 4, 4, dtype=D, offset=2.0)
    stats = torch.stack([z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False) * 48]).requires_grad_(True)
    g, b = _req(vec(5, D, positive=True), vec(5, D))
    assert gradcheck(lambda st, g, b: ref.bn_finalize(st, 48, g, b, 1e-5), (stats, g, b))
    assert gradcheck(lambda st: ref.bn_finalize(st, 48, None, None, 1e-3), (stats,))


@pytest.mark.parametrize("mode", ["plain", "residual", "dual", "res_scale_only", "no_relu"])
def test_bn_add_act_gradcheck(mode):
    z = rand(2, 4, 3, 3, dtype=D)
    r = rand(2, 4, 3, 3, dtype=D) if mode != "plain" else None
    rs = vec(4, D) if mode in ("dual", "res_scale_only") else None
    rb = vec(4, D) if mode == "dual" else None
    args = _req(z, vec(4, D), vec(4, D), r, rs, rb)
    relu = mode != "no_relu"
    assert gradcheck(lambda *a: ref.bn_add_act(*a, relu=relu), tuple(args))


@pytest.mark.parametrize("mode", ["plain", "residual", "dual", "no_relu"])
def test_bn_add_act_backward_is_the_gradient(mode):
    z = rand(2, 5, 3, 4, dtype=D)
    r = rand(2, 5, 3, 4, dtype=D) if mode != "plain" else None
    rs = vec(5, D) if mode == "dual" else None
    rb = vec(5, D) if mode == "dual" else None
    s, b = vec(5, D), vec(5, D)
    relu = mode != "no_relu"
    g = rand(2, 5, 3, 4, dtype=D)
    inputs = _req(z, s, b, r, rs, rb)
    y = ref.bn_add_act(*inputs, relu=relu)
    wanted = [t for t in inputs if t is not None]
    auto = dict(zip([id(t) for t in wanted], torch.autograd.grad(y, wanted, g), strict=True))
    gz, gs, gb, gr, grs = ref.bn_add_act_backward(g, z, s, b, r, rs, rb, relu)
    torch.testing.assert_close(gz, auto[id(inputs[0])])
    torch.testing.assert_close(gs, auto[id(inputs[1])])
    torch.testing.assert_close(gb, auto[id(inputs[2])])
    if r is None:
        assert gr.numel() == 0 and grs.numel() == 0
    else:
        torch.testing.assert_close(gr, auto[id(inputs[3])])
    if rs is not None:
        torch.testing.assert_close(grs, auto[id(inputs[4])])
        torch.testing.assert_close(gb, auto[id(inputs[5])])  # res_shift's gradient is grad_shift


def test_stats_backward_is_the_gradient():
    x, w, _, _, _ = conv_inputs(ConvCase(2, 3, 5, 5, 4), D)
    z, stats = ref.conv_stats(x, w, padding=(1, 1))
    gz, gst = rand(*z.shape, dtype=D), torch.randn(2, 4, dtype=D)
    # Gradient of L = <gz, z> + <gst, stats(z)> with respect to z, by autograd on a leaf copy.
    zl = z.detach().clone().requires_grad_(True)
    mean = zl.mean((0, 2, 3))
    m2 = ((zl - mean.view(1, -1, 1, 1)) ** 2).sum((0, 2, 3))
    loss = (gz * zl).sum() + (gst[0] * mean).sum() + (gst[1] * m2).sum()
    (auto,) = torch.autograd.grad(loss, zl)
    count = z.numel() // z.shape[1]
    torch.testing.assert_close(ref.stats_backward(gz, gst, z.detach(), stats.detach(), count), auto)


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_conv_bn_act_is_eval_batchnorm(case):
    """conv_bn_act with folded BN == conv -> BatchNorm2d(eval) -> add -> relu, as torchvision runs it."""
    x, w, _, _, r = conv_inputs(case, D, residual=True)
    bn = torch.nn.BatchNorm2d(case.k).to(D).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(case.k, dtype=D))
        bn.running_var.copy_(torch.rand(case.k, dtype=D) + 0.5)
        bn.weight.copy_(torch.randn(case.k, dtype=D))
        bn.bias.copy_(torch.randn(case.k, dtype=D))
    scale, shift = ref.fold_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    expected = F.relu(bn(F.conv2d(x, w, None, case.stride, case.padding, case.dilation, case.groups)) + r)
    got = ref.conv_bn_act(x, w, scale, shift, r, (case.stride,) * 2, (case.padding,) * 2,
                          (case.dilation,) * 2, case.groups, True)
    torch.testing.assert_close(got, expected.detach())
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_training_chain_is_train_batchnorm(momentum):
    """conv_stats -> bn_finalize -> bn_update_running_stats -> bn_add_act == conv -> BatchNorm2d(train)."""
    case = ConvCase(4, 6, 7, 7, 5, stride=2)
    x, w, _, _, r = conv_inputs(case, D, residual=True)
    bn = torch.nn.BatchNorm2d(case.k, momentum=momentum).to(D).train()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(case.k, dtype=D))
        bn.bias.copy_(torch.randn(case.k, dtype=D))
        bn.running_mean.copy_(torch.randn(case.k, dtype=D))
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(3):  # several steps, so momentum=None's cumulative average is exercised
        expected = F.relu(bn(F.conv2d(x, w, None, 2, 1)) + r)
        z, stats = ref.conv_stats(x, w, stride=(2, 2), padding=(1, 1))
        count = z.numel() // case.k
        s, b, mean, invstd = ref.bn_finalize(stats, count, bn.weight, bn.bias, bn.eps)
        ref.bn_update_running_stats(stats, count, rm, rv, nbt, momentum)
        got = ref.bn_add_act(z, s, b, r)
        torch.testing.assert_close(got, expected.detach())
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)
    assert nbt.item() == bn.num_batches_tracked.item() == 3


def test_prologue_padding_is_zero_after_transform():
    """A padded pixel is 0 after the prologue, not relu(0 * scale + shift)."""
    x = rand(1, 2, 3, 3, dtype=D)
    w = rand(4, 2, 3, 3, dtype=D)
    s, b = vec(2, D, positive=True), vec(2, D).abs() + 1.0  # shift > 0: transform(0) != 0
    z, _ = ref.conv_stats(x, w, s, b, True, padding=(1, 1))
    xin = F.relu(x * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
    torch.testing.assert_close(z, F.conv2d(xin, w, padding=1))


def test_stats_accurate_when_mean_dominates():
    """Mean/M2 statistics keep the variance when |mean| >> std (float32 sum/sumsq would not)."""
    x = rand(4, 8, 16, 16, dtype=torch.float32)
    w = torch.zeros(8, 8, 1, 1)
    w[:, :, 0, 0] = torch.eye(8)
    z, stats = ref.conv_stats(x + 1000.0, w)
    var = stats[1] / (z.numel() // 8)
    expected = x.double().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(var.double(), expected, rtol=1e-3, atol=0)
