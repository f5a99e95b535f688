"""conv_bn_act_residual_: conv_bn_act written into its residual (the eval plans' block end when the
shortcut is dead). Checked against fused_resnet/reference.py in float64 at real ResNet shapes and odd
ones, on every CPU path (oneDNN's in-place "sum" post-op for float32 channels_last; out of place +
copy otherwise), plus its contract: the residual's memory is written and nothing else, the version
counter moves, bad arguments raise naming the argument, and it refuses to run where a gradient is
wanted."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_CASES, CL, ConvCase, assert_matches, conv_inputs, f64, rand, requires_c

from fused_resnet import reference as ref

pytestmark = requires_c

ops = torch.ops.fused_resnet if hasattr(torch.ops, "fused_resnet") else None


def _args(case: ConvCase):
    return [case.stride] * 2, [case.padding] * 2, [case.dilation] * 2, case.groups


def _expected(x, w, s, b, r, case, relu):
    return ref.conv_bn_act(f64(x), f64(w), f64(s), f64(b), f64(r), *_args(case), relu)


def _run(x, w, s, b, r, case, relu):
    """Calls the op; checks it returned None and wrote r in place (same memory, version moved)."""
    ptr, version, x_before = r.data_ptr(), r._version, x.clone()
    assert ops.conv_bn_act_residual_(x, w, s, b, r, *_args(case), relu) is None
    assert r.data_ptr() == ptr
    assert r._version > version
    assert torch.equal(x, x_before), "x must not be written"
    return r


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_matches_the_reference(case, dtype, relu):
    x, w, s, b, r = conv_inputs(case, dtype, residual=True)
    expected = _expected(x, w, s, b, r, case, relu)
    assert_matches(_run(x, w, s, b, r, case, relu), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ALL_CASES[1:4], ids=str)
def test_low_precision_by_the_design_rule(case, dtype):
    x, w, s, b, r = conv_inputs(case, dtype, residual=True)
    expected = _expected(x, w, s, b, r, case, True)
    lowp = ref.conv_bn_act(x, w, s, b, r, *_args(case), True)  # torch's own error in this dtype
    assert_matches(_run(x, w, s, b, r, case, True), expected, dtype, lowp_reference=lowp)


@pytest.mark.parametrize("path", ["nchw_residual", "onednn_off", "onednn_disabled"])
def test_fallback_paths_equal_conv_bn_act_exactly(path, monkeypatch):
    """Where oneDNN cannot write into the residual, the op is conv_bn_act + a copy: bit for bit."""
    case = ConvCase(2, 64, 9, 7, 48)
    x, w, s, b, r = conv_inputs(case, residual=True)
    if path == "nchw_residual":
        r = r.contiguous()
    elif path == "onednn_off":
        monkeypatch.setenv("FUSED_RESNET_CPU_ONEDNN", "0")
    reference = _expected(x, w, s, b, r, case, True)
    with torch.backends.mkldnn.flags(enabled=path != "onednn_disabled"):
        expected = ops.conv_bn_act(x, w, s, b, r, *_args(case), True)
        _run(x, w, s, b, r, case, True)
    assert torch.equal(r, expected)
    assert_matches(r, reference, torch.float32)


def test_in_place_path_keeps_a_channels_last_residual_and_its_neighbours():
    """The residual is a view into a larger buffer (a batch slice): only its elements change."""
    case = ConvCase(2, 32, 8, 8, 40, 1, 1, padding=0)
    x, w, s, b, _ = conv_inputs(case)
    big = rand(4, 40, 8, 8)
    before = big.clone()
    r = big[1:3]
    assert r.is_contiguous(memory_format=CL)
    expected = _expected(x, w, s, b, r, case, True)
    _run(x, w, s, b, r, case, True)
    assert_matches(r, expected, torch.float32)
    assert torch.equal(big[0], before[0]) and torch.equal(big[3], before[3])


def test_opcheck():
    case = ConvCase(2, 4, 5, 5, 6)
    x, w, s, b, r = conv_inputs(case, residual=True)
    torch.library.opcheck(ops.conv_bn_act_residual_.default, (x, w, s, b, r, *_args(case), True))


def test_torch_compile_traces_it():
    case = ConvCase(2, 8, 6, 6, 8)
    x, w, s, b, r = conv_inputs(case, residual=True)
    r2 = r.clone()

    def f(x, r):
        ops.conv_bn_act_residual_(x, w, s, b, r, *_args(case), True)
        return r * 2

    with torch.no_grad():
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r)
        want = f(x, r2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(r, r2)


def test_inference_mode_and_inference_tensors():
    case = ConvCase(1, 8, 5, 5, 8)
    with torch.inference_mode():
        x, w, s, b, r = conv_inputs(case, residual=True)
        expected = _expected(x, w, s, b, r, case, True)
        assert ops.conv_bn_act_residual_(x, w, s, b, r, *_args(case), True) is None
    assert_matches(r, expected, torch.float32)
    # Writing an inference tensor outside inference mode is refused, as for any in-place op.
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        ops.conv_bn_act_residual_(x, w, s, b, r, *_args(case), True)


def test_bad_arguments_raise_naming_them():
    case = ConvCase(2, 8, 6, 6, 8)
    x, w, s, b, r = conv_inputs(case, residual=True)
    a = _args(case)
    with pytest.raises(RuntimeError, match="residual: expected shape"):
        ops.conv_bn_act_residual_(x, w, s, b, rand(2, 8, 5, 6), *a, True)
    with pytest.raises(RuntimeError, match="residual: expected dtype"):
        ops.conv_bn_act_residual_(x, w, s, b, r.double(), *a, True)
    with pytest.raises(RuntimeError, match="residual: expected a tensor whose elements do not share memory"):
        ops.conv_bn_act_residual_(x, w, s, b, rand(2, 8, 6, 1).expand(2, 8, 6, 6), *a, True)
    with pytest.raises(RuntimeError, match="residual: must not share memory with x"):
        ops.conv_bn_act_residual_(x, w, s, b, x, *a, True)
    with pytest.raises(RuntimeError, match="scale: expected shape"):
        ops.conv_bn_act_residual_(x, w, s[:3], b, r, *a, True)
    with pytest.raises((RuntimeError, TypeError)):
        ops.conv_bn_act_residual_(x, w, s, b, None, *a, True)
    before = r.clone()
    wg = w.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.conv_bn_act_residual_(x, wg, s, b, r, *a, True)
    assert torch.equal(r, before), "a refused call must not write"
    with torch.no_grad():
        ops.conv_bn_act_residual_(x, wg, s, b, r, *a, True)  # no gradient wanted: fine
    assert not torch.equal(r, before)
