"""Property-based tests: random valid convolution configurations, every CPU backend against the
float64 reference.

Hypothesis draws batch, channels, H/W, kernel, stride, padding, dilation, groups, dtype, input
layout (channels_last, NCHW, a non-contiguous view) and the optional parts of each op (residual,
ReLU, prologue, dual-BN shortcut). Runs are derandomized so CI is reproducible; set
``FUSED_RESNET_FUZZ_EXAMPLES`` to draw more examples (e.g. 2000 for a soak run).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import CL, assert_matches, conv_config_strategy, conv_out_hw, f64, requires_c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_resnet import functional as FF
from fused_resnet import reference as ref

BACKENDS = ["torch", pytest.param("cpu", marks=requires_c)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SETTINGS = settings(
    max_examples=int(os.environ.get("FUSED_RESNET_FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# CPU ranges: up to 6 channels per group, kernels up to 7x7 (rectangular too), stride 3, padding 3.
CONV_CONFIGS = conv_config_strategy(max_per_group=6, kernels=((1, 1), (3, 3), (3, 3), (7, 7), (1, 3), (3, 1)),
                                    max_stride=3, max_padding=3, extra_hw=9)


def _act(shape, dtype, layout, gen, scale=1.0):
    """A random activation in the requested memory layout (never all zeros)."""
    n, c, h, w = shape
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        t = torch.randn(n, c, h, 2 * w, dtype=torch.float64, generator=gen)[..., ::2]
    else:
        t = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen)
    t = (t * scale).to(dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=CL)
    return t


def _vec(k, dtype, gen, positive=False):
    v = torch.randn(k, dtype=torch.float64, generator=gen)
    if positive:
        v = v.abs() + 0.5
    return v.to(ref.acc_dtype(dtype))


def _conv_kwargs(cfg):
    return dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])


LAYOUTS = st.sampled_from(["channels_last", "channels_last", "contiguous", "strided"])


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(cfg=CONV_CONFIGS, dtype=st.sampled_from(DTYPES), layout=LAYOUTS, residual=st.booleans(),
       relu=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_conv_bn_act_matches_reference(backend, cfg, dtype, layout, residual, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _act((cfg["n"], cfg["c"], cfg["h"], cfg["w"]), dtype, layout, gen)
    fan_in = cfg["c"] // cfg["groups"] * cfg["r"] * cfg["s"]
    w = (torch.randn(cfg["k"], cfg["c"] // cfg["groups"], cfg["r"], cfg["s"], dtype=torch.float64, generator=gen)
         * (2.0 / fan_in) ** 0.5).to(dtype)
    scale, shift = _vec(cfg["k"], dtype, gen, positive=True), _vec(cfg["k"], dtype, gen)
    res = _act((cfg["n"], cfg["k"], *conv_out_hw(cfg)), dtype, layout, gen) if residual else None

    y = FF.conv_bn_act(x, w, scale, shift, res, relu=relu, backend=backend, **_conv_kwargs(cfg))

    assert y.shape == (cfg["n"], cfg["k"], *conv_out_hw(cfg)) and y.dtype == dtype
    assert y.is_contiguous(memory_format=CL)
    expected = ref.conv_bn_act(f64(x), f64(w), f64(scale), f64(shift), f64(res), relu=relu, **_conv_kwargs(cfg))
    lowp = None
    if dtype in (torch.float16, torch.bfloat16):
        lowp = ref.conv_bn_act(x, w, scale, shift, res, relu=relu, **_conv_kwargs(cfg))
    assert_matches(y, expected, dtype, lowp, what=f"conv_bn_act {cfg}")


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(cfg=CONV_CONFIGS, dtype=st.sampled_from(DTYPES), layout=LAYOUTS,
       prologue=st.sampled_from(["none", "bn", "bn_relu", "relu"]), offset=st.sampled_from([0.0, 50.0]),
       seed=st.integers(0, 2**31 - 1))
def test_conv_stats_matches_reference(backend, cfg, dtype, layout, prologue, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _act((cfg["n"], cfg["c"], cfg["h"], cfg["w"]), dtype, layout, gen)
    w = torch.randn(cfg["k"], cfg["c"] // cfg["groups"], cfg["r"], cfg["s"], dtype=torch.float64,
                    generator=gen).to(dtype)
    in_scale = _vec(cfg["c"], dtype, gen, positive=True) if prologue in ("bn", "bn_relu") else None
    # a large shift makes |mean| >> std in z: the statistics must stay accurate there too
    in_shift = (_vec(cfg["c"], dtype, gen) + offset).to(ref.acc_dtype(dtype)) if prologue in ("bn", "bn_relu") else None
    in_relu = prologue in ("bn_relu", "relu")

    z, stats = FF.conv_stats(x, w, in_scale, in_shift, in_relu, backend=backend, **_conv_kwargs(cfg))

    ez, estats = ref.conv_stats(f64(x), f64(w), f64(in_scale), f64(in_shift), in_relu, **_conv_kwargs(cfg))
    lz, lstats = None, None
    if dtype in (torch.float16, torch.bfloat16):
        lz, lstats = ref.conv_stats(x, w, in_scale, in_shift, in_relu, **_conv_kwargs(cfg))
    assert z.dtype == dtype and z.is_contiguous(memory_format=CL)
    assert stats.shape == (2, cfg["k"]) and stats.dtype == ref.acc_dtype(dtype)
    assert_matches(z, ez, dtype, lz, what=f"conv_stats z {cfg}")
    for row, name in enumerate(["mean", "M2"]):
        assert_matches(stats[row], estats[row], dtype, None if lstats is None else lstats[row],
                       what=f"conv_stats {name} {cfg}")


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(n=st.integers(1, 3), k=st.integers(1, 40), hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       dtype=st.sampled_from(DTYPES), layout=LAYOUTS,
       shortcut=st.sampled_from(["none", "identity", "dual_bn", "res_scale_only"]), relu=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_bn_add_act_matches_reference(backend, n, k, hw, dtype, layout, shortcut, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    z = _act((n, k, *hw), dtype, layout, gen, scale=3.0)
    scale, shift = _vec(k, dtype, gen, positive=True), _vec(k, dtype, gen)
    res = None if shortcut == "none" else _act((n, k, *hw), dtype, layout, gen)
    rs = _vec(k, dtype, gen, positive=True) if shortcut in ("dual_bn", "res_scale_only") else None
    rb = _vec(k, dtype, gen) if shortcut == "dual_bn" else None

    y = FF.bn_add_act(z, scale, shift, res, rs, rb, relu=relu, backend=backend)

    expected = ref.bn_add_act(f64(z), f64(scale), f64(shift), f64(res), f64(rs), f64(rb), relu)
    lowp = ref.bn_add_act(z, scale, shift, res, rs, rb, relu) if dtype in (torch.float16, torch.bfloat16) else None
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    assert_matches(y, expected, dtype, lowp, what="bn_add_act")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(SETTINGS, max_examples=max(10, SETTINGS.max_examples // 2))
@given(cfg=CONV_CONFIGS, residual=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_conv_bn_act_gradients_match_reference(backend, cfg, residual, relu, seed):
    """float64 gradients of x, weight, scale, shift and residual through the backend's autograd."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    x = _act((cfg["n"], cfg["c"], cfg["h"], cfg["w"]), dt, "channels_last", gen).requires_grad_()
    w = torch.randn(cfg["k"], cfg["c"] // cfg["groups"], cfg["r"], cfg["s"], dtype=dt, generator=gen)
    w.requires_grad_()
    scale = _vec(cfg["k"], dt, gen, positive=True).requires_grad_()
    shift = _vec(cfg["k"], dt, gen).requires_grad_()
    res = _act((cfg["n"], cfg["k"], *conv_out_hw(cfg)), dt, "channels_last", gen).requires_grad_() if residual else None
    inputs = [t for t in (x, w, scale, shift, res) if t is not None]
    grad_out = torch.randn(cfg["n"], cfg["k"], *conv_out_hw(cfg), dtype=dt, generator=gen)

    y = FF.conv_bn_act(x, w, scale, shift, res, relu=relu, backend=backend, **_conv_kwargs(cfg))
    got = torch.autograd.grad(y, inputs, grad_out)
    e = ref.conv_bn_act(x, w, scale, shift, res, relu=relu, **_conv_kwargs(cfg))
    want = torch.autograd.grad(e, inputs, grad_out)
    for name, a, b in zip(["x", "weight", "scale", "shift", "residual"], got, want, strict=False):
        assert_matches(a, b, dt, what=f"grad {name} {cfg}")
