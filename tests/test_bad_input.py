"""Every invalid call raises a clear exception naming the argument and the expected value."""

from __future__ import annotations

import pytest
import torch
from conftest import ConvCase, conv_inputs, rand, vec

from fused_resnet import _ext
from fused_resnet import functional as FF

BACKENDS = ["torch"] + (["cpu"] if _ext.available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _good():
    return conv_inputs(ConvCase(2, 4, 5, 5, 6), residual=True)


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a: a.update(x=a["x"][0]), ValueError, r"x: expected a 4-D tensor \(N, C, H, W\), got 3-D"),
        (lambda a: a.update(x=a["x"].int()), TypeError, r"x: expected float32, float64, float16 or bfloat16"),
        (lambda a: a.update(x=a["x"].to_sparse()), ValueError, r"x: expected a dense \(strided\) tensor"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, r"weight: expected dtype torch.float32"),
        (lambda a: a.update(weight=a["weight"][:, :3]), ValueError, r"weight: expected shape \(K, 4, R, S\)"),
        (lambda a: a.update(weight=a["weight"][0]), ValueError, r"weight: expected a 4-D tensor"),
        (lambda a: a.update(scale=a["scale"][:5]), ValueError, r"scale: expected shape \(6,\), got \(5,\)"),
        (lambda a: a.update(shift=a["shift"].half()), TypeError, r"shift: expected dtype torch.float32"),
        (lambda a: a.update(scale=None), TypeError, r"scale: expected a tensor of shape \(6,\), got None"),
        (lambda a: a.update(residual=a["residual"][:, :5]), ValueError, r"residual: expected shape \(2, 6, 5, 5\)"),
        (lambda a: a.update(residual=a["residual"].double()), TypeError, r"residual: expected dtype torch.float32"),
        (lambda a: a.update(stride=0), ValueError, r"stride: expected values >= 1, got 0"),
        (lambda a: a.update(stride=(1, -2)), ValueError, r"stride: expected values >= 1"),
        (lambda a: a.update(padding=-1), ValueError, r"padding: expected values >= 0, got -1"),
        (lambda a: a.update(padding="same"), ValueError, r"padding: string values"),
        (lambda a: a.update(dilation=(1, 2, 3)), TypeError, r"dilation: expected an int or a pair of ints"),
        (lambda a: a.update(groups=0), ValueError, r"groups: expected an int >= 1, got 0"),
        (lambda a: a.update(groups=3), ValueError, r"groups: x has 4 channels, not divisible by groups=3"),
        (lambda a: a.update(padding=0, x=a["x"][:, :, :2, :2], residual=None), ValueError,
         r"x: spatial size \(2, 2\) with padding \(0, 0\) is smaller than the dilated kernel \(3\)"),
    ],
)
def test_conv_bn_act_bad_input(backend, mutate, exc, pattern):
    x, w, s, b, r = _good()
    args = dict(x=x, weight=w, scale=s, shift=b, residual=r, padding=1)
    mutate(args)
    with pytest.raises(exc, match=pattern):
        FF.conv_bn_act(**args, backend=backend)


def test_device_mismatch_is_named(backend):
    x, w, s, b, _ = _good()
    with pytest.raises(ValueError, match=r"scale: expected device cpu, got meta"):
        FF.conv_bn_act(x, w, s.to("meta"), b, padding=1, backend=backend)
    with pytest.raises(ValueError, match=r"weight: expected device cpu \(same as x\), got meta"):
        FF.conv_bn_act(x, w.to("meta"), s, b, padding=1, backend=backend)


def test_conv_stats_bad_prologue(backend):
    x, w, _, _, _ = _good()
    with pytest.raises(ValueError, match=r"in_scale: expected shape \(4,\), got \(6,\)"):
        FF.conv_stats(x, w, vec(6), None, True, padding=1, backend=backend)
    with pytest.raises(TypeError, match=r"in_shift: expected dtype torch.float32"):
        FF.conv_stats(x, w, None, vec(4).double(), True, padding=1, backend=backend)


def test_bn_finalize_bad_input(backend):
    stats = torch.stack([torch.randn(6), torch.rand(6) + 1])
    with pytest.raises(ValueError, match=r"stats: expected shape \(2, K\)"):
        FF.bn_finalize(stats[0], 10, backend=backend)
    with pytest.raises(TypeError, match=r"stats: expected float32 or float64"):
        FF.bn_finalize(stats.half(), 10, backend=backend)
    with pytest.raises(ValueError, match=r"count: expected more than 1 value per channel"):
        FF.bn_finalize(stats, 1, backend=backend)
    with pytest.raises(ValueError, match=r"gamma: expected shape \(6,\)"):
        FF.bn_finalize(stats, 10, gamma=vec(5), backend=backend)
    with pytest.raises(ValueError, match="running_mean, running_var: expected both or neither"):
        FF.bn_finalize(stats, 10, running_mean=torch.zeros(6), backend=backend)
    with pytest.raises(ValueError, match="momentum: None"):
        FF.bn_finalize(stats, 10, running_mean=torch.zeros(6), running_var=torch.ones(6), momentum=None,
                       backend=backend)
    with pytest.raises(ValueError, match="momentum: expected a float in"):
        FF.bn_finalize(stats, 10, running_mean=torch.zeros(6), running_var=torch.ones(6), momentum=1.5,
                       backend=backend)


def test_bn_add_act_bad_input(backend):
    z = rand(2, 6, 3, 3)
    with pytest.raises(ValueError, match="res_scale, res_shift: given without a residual"):
        FF.bn_add_act(z, vec(6), vec(6), None, vec(6), None, backend=backend)
    with pytest.raises(ValueError, match=r"residual: expected shape \(2, 6, 3, 3\), got \(2, 6, 3, 2\)"):
        FF.bn_add_act(z, vec(6), vec(6), rand(2, 6, 3, 2), backend=backend)
    with pytest.raises(ValueError, match=r"z: expected a 4-D tensor"):
        FF.bn_add_act(z.flatten(2), vec(6), vec(6), backend=backend)
    with pytest.raises(TypeError, match=r"res_shift: expected dtype torch.float32"):
        FF.bn_add_act(z, vec(6), vec(6), rand(2, 6, 3, 3), None, vec(6).double(), backend=backend)


@pytest.mark.parametrize("op", ["conv_bn_act", "conv_stats"])
def test_zero_input_channels_and_empty_kernel_are_refused(backend, op):
    """C = 0 (F.conv2d returns a wrongly shaped result for it) and a 0-sized kernel are refused."""
    w0 = rand(6, 0, 3, 3)
    x0 = rand(2, 0, 5, 5).contiguous(memory_format=torch.channels_last)
    x, w, s, b, _ = _good()
    fn = getattr(FF, op)
    extra = (s, b) if op == "conv_bn_act" else ()
    with pytest.raises(ValueError, match=r"x: expected at least one input channel \(C >= 1\), got shape \(2, 0, 5"):
        fn(x0, w0, *extra, padding=1, backend=backend)
    with pytest.raises(ValueError, match=r"weight: expected a kernel of at least 1x1, got shape \(6, 4, 0, 3\)"):
        fn(x, w[:, :, :0], *extra, padding=1, backend=backend)


@pytest.mark.skipif(not _ext.available(), reason="needs the compiled _C")
def test_zero_input_channels_refused_by_the_compiled_op():
    """Direct torch.ops calls get the same refusal from the C++ checks (RuntimeError)."""
    x0 = rand(2, 0, 5, 5).contiguous(memory_format=torch.channels_last)
    w0 = rand(6, 0, 3, 3)
    with pytest.raises(RuntimeError, match=r"x: expected at least one input channel \(C >= 1\)"):
        torch.ops.fused_resnet.conv_bn_act(x0, w0, vec(6), vec(6), None, [1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match=r"weight: expected a kernel of at least 1x1"):
        torch.ops.fused_resnet.conv_stats(rand(2, 4, 5, 5), rand(6, 4, 0, 3), None, None, False, [1, 1], [1, 1],
                                          [1, 1], 1)
