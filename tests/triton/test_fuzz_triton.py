"""Property-based tests of the Triton backend under the interpreter: random valid conv configs
through the public API (``backend="triton"``) against the float64 reference.

Hypothesis draws batch 1-3, C and K 1-24 (groups dividing both), H and W 1-9, kernel 1/3/5,
stride 1-2, padding 0-2, dilation 1-2, float32 or float16, and the optional parts (residual,
ReLU; prologue BN / BN+ReLU / ReLU for conv_stats, with a large shift so |mean| >> std). Runs are
derandomized (reproducible in CI) and small (the interpreter is slow); set
``FUSED_RESNET_TRITON_FUZZ_EXAMPLES`` for a longer soak. Every call must actually run on Triton
(no silent fallback). Runs in its own process with ``TRITON_INTERPRET=1`` (tests/test_triton.py).
"""

from _interp import require_interpreter

require_interpreter()

import os  # noqa: E402

import torch  # noqa: E402
from conftest import CL, assert_matches, conv_config_strategy, conv_out_hw, f64  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fused_resnet import backends  # noqa: E402
from fused_resnet import functional as FF  # noqa: E402
from fused_resnet import reference as ref  # noqa: E402

SETTINGS = settings(
    max_examples=int(os.environ.get("FUSED_RESNET_TRITON_FUZZ_EXAMPLES", "12")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# Interpreter-sized ranges: at most 24 channels, kernels 1/3/5 in each direction, sizes <= 9.
CONV_CONFIGS = conv_config_strategy(max_channels=24, kernels=[(r, s) for r in (1, 3, 5) for s in (1, 3, 5)],
                                    max_stride=2, max_padding=2, max_hw=9)


def _kw(cfg):
    return dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])


def _act(shape, dtype, gen, channels_last):
    t = torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)
    return t.contiguous(memory_format=CL) if channels_last else t


def _vec(k, gen, positive=False, offset=0.0):
    v = torch.randn(k, dtype=torch.float64, generator=gen)
    return ((v.abs() + 0.5) if positive else v + offset).float()


def _weight(cfg, dtype, gen):
    fan_in = cfg["c"] // cfg["groups"] * cfg["r"] * cfg["s"]
    return (torch.randn(cfg["k"], cfg["c"] // cfg["groups"], cfg["r"], cfg["s"], dtype=torch.float64, generator=gen)
            * (2.0 / fan_in) ** 0.5).to(dtype)


def _ran_on_triton(log, op):
    ran = [d for d in log if d.op == op]
    assert ran and all(d.backend == "triton" for d in ran), [(d.op, d.backend, d.reason) for d in ran]


@SETTINGS
@given(cfg=CONV_CONFIGS, dtype=st.sampled_from([torch.float32, torch.float16]), residual=st.booleans(),
       relu=st.booleans(), channels_last=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_conv_bn_act_triton_matches_reference(cfg, dtype, residual, relu, channels_last, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _act((cfg["n"], cfg["c"], cfg["h"], cfg["w"]), dtype, gen, channels_last)
    w = _weight(cfg, dtype, gen)
    scale, shift = _vec(cfg["k"], gen, positive=True), _vec(cfg["k"], gen)
    res = _act((cfg["n"], cfg["k"], *conv_out_hw(cfg)), dtype, gen, True) if residual else None

    with backends.trace() as log:
        y = FF.conv_bn_act(x, w, scale, shift, res, relu=relu, backend="triton", **_kw(cfg))
    _ran_on_triton(log, "conv_bn_act")

    assert y.shape == (cfg["n"], cfg["k"], *conv_out_hw(cfg)) and y.dtype == dtype
    assert y.is_contiguous(memory_format=CL)
    expected = ref.conv_bn_act(f64(x), f64(w), f64(scale), f64(shift), f64(res), relu=relu, **_kw(cfg))
    lowp = ref.conv_bn_act(x, w, scale, shift, res, relu=relu, **_kw(cfg)) if dtype == torch.float16 else None
    assert_matches(y, expected, dtype, lowp, what=f"triton conv_bn_act {cfg}")


@SETTINGS
@given(cfg=CONV_CONFIGS, dtype=st.sampled_from([torch.float32, torch.float16]),
       prologue=st.sampled_from(["none", "bn", "bn_relu", "relu"]), offset=st.sampled_from([0.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))
def test_conv_stats_triton_matches_reference(cfg, dtype, prologue, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _act((cfg["n"], cfg["c"], cfg["h"], cfg["w"]), dtype, gen, True)
    w = _weight(cfg, dtype, gen)
    in_scale = _vec(cfg["c"], gen, positive=True) if prologue in ("bn", "bn_relu") else None
    in_shift = _vec(cfg["c"], gen, offset=offset) if prologue in ("bn", "bn_relu") else None
    in_relu = prologue in ("bn_relu", "relu")

    with backends.trace() as log:
        z, stats = FF.conv_stats(x, w, in_scale, in_shift, in_relu, backend="triton", **_kw(cfg))
    _ran_on_triton(log, "conv_stats")

    ez, estats = ref.conv_stats(f64(x), f64(w), f64(in_scale), f64(in_shift), in_relu, **_kw(cfg))
    lz = lstats = None
    if dtype == torch.float16:
        lz, lstats = ref.conv_stats(x, w, in_scale, in_shift, in_relu, **_kw(cfg))
    assert z.dtype == dtype and z.is_contiguous(memory_format=CL)
    assert stats.shape == (2, cfg["k"]) and stats.dtype == torch.float32
    assert_matches(z, ez, dtype, lz, what=f"triton conv_stats z {cfg}")
    for row, name in enumerate(["mean", "M2"]):
        assert_matches(stats[row], estats[row], dtype, None if lstats is None else lstats[row],
                       what=f"triton conv_stats {name} {cfg}")
