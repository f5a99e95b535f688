"""The oneDNN fast path of the CPU conv_bn_act (csrc/cpu/onednn.cpp): float32 calls run as one
oneDNN convolution with fused post-ops on folded, pre-packed, cached weights.

Which path ran is observed from the dispatcher through the profiler (the fast path calls
``mkldnn::_convolution_pointwise`` and packs with ``mkldnn::_reorder_convolution_weight``);
every result is compared with the float64 reference on fresh random inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import ODD_CASES, RESNET_CASES, ConvCase, assert_matches, conv_inputs, f64, rand, requires_c, vec

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
    y, ops = _ops_called(lambda: _call(x, w, s, b, r, case, relu))
    assert ops.get(POINTWISE, 0) == 1, f"fast path not taken: {sorted(ops)}"
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
    errors = []

    def work(i):
        try:
            for _ in range(5):
                x, w, s, b, r = inputs[i]
                assert_matches(_call(x, w, s, b, r, cases[i]), _expected(x, w, s, b, r, cases[i]), torch.float32)
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
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
