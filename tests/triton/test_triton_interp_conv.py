"""Triton implicit-GEMM convolution (conv_bn_act, conv_stats) under the interpreter vs the reference.

Small ResNet-like shapes (stem 7x7/s2, 3x3 s1/s2, 1x1 s1 = plain GEMM, 1x1 s2 projection,
grouped) and odd ones (batch 1, H = W = 1, odd channel counts, dilation, depthwise, channels
not a multiple of the 16-wide interpreter tile), float32 and float16, compared with
:mod:`fused_resnet.reference` on float64 copies of the same random inputs (float32: tight;
float16: the 2x-PyTorch's-own-error rule of ``assert_matches``).
"""

from _interp import require_interpreter

require_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import ConvCase, assert_matches, conv_inputs, f64, rand, spy_triton_launches, vec  # noqa: E402

from fused_resnet import reference as ref  # noqa: E402
from fused_resnet.triton import load_ops  # noqa: E402

T = load_ops()

SMALL_RESNET = [
    ConvCase(2, 3, 10, 10, 16, 7, 7, stride=2, padding=3),  # stem
    ConvCase(2, 16, 8, 8, 16),  # 3x3 s1
    ConvCase(2, 32, 6, 6, 16, 1, 1, padding=0),  # 1x1 s1: plain GEMM path
    ConvCase(2, 16, 8, 8, 32, stride=2),  # 3x3 s2 (stage entry)
    ConvCase(2, 32, 6, 6, 32, 1, 1, stride=2, padding=0),  # 1x1 s2 projection
    ConvCase(2, 32, 5, 5, 32, groups=8),  # ResNeXt-style grouped 3x3 (4 channels per group)
]
ODD = [
    ConvCase(1, 5, 7, 9, 7),  # batch 1, odd channels, non-square
    ConvCase(3, 3, 1, 1, 5, 1, 1, padding=0),  # H = W = 1 (GEMM path, M = 3)
    ConvCase(2, 6, 5, 5, 9, padding=2, dilation=2),  # dilation
    ConvCase(2, 8, 6, 6, 8, groups=8),  # depthwise
    ConvCase(2, 12, 9, 7, 6, stride=2, padding=0, groups=3),  # stride 2, groups, no padding
    ConvCase(1, 33, 4, 4, 17, 3, 1, padding=1),  # 3x1 kernel, C and K beyond one tile
    ConvCase(2, 4, 9, 11, 8, 3, 5, stride=2, padding=2),  # packed taps: a 1x5 run of 20 > one 16-wide step
    ConvCase(2, 3, 5, 6, 16, 3, 3, padding=1),  # packed taps: a 3-tap run of 9 in one step (CIFAR-style stem)
]
CASES = SMALL_RESNET + ODD
FP16_CASES = [SMALL_RESNET[0], SMALL_RESNET[2], SMALL_RESNET[5], ODD[5]]
#: Cases whose kernel runs with packed taps (few input channels, one group, W-dilation 1, S > 1):
#: the stem, batch 1 with 5 channels, and the two packed-taps cases above.
PACKED = [SMALL_RESNET[0], ODD[0], ODD[6], ODD[7]]


def _args(case):
    return [case.stride] * 2, [case.padding] * 2, [case.dilation] * 2, case.groups


def _check_conv_bn_act(case, dtype, residual, relu):
    x, w, s, b, r = conv_inputs(case, dtype, residual=residual)
    st, pad, dil, g = _args(case)
    y = T.conv_bn_act(x, w, s, b, r, st, pad, dil, g, relu)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    expected = ref.conv_bn_act(f64(x), f64(w), f64(s), f64(b), f64(r), st, pad, dil, g, relu)
    lowp = ref.conv_bn_act(x, w, s, b, r, st, pad, dil, g, relu) if dtype != torch.float32 else None
    assert_matches(y, expected, dtype, lowp, what=f"conv_bn_act {case}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_bn_act_float32(case):
    _check_conv_bn_act(case, torch.float32, residual=True, relu=True)


@pytest.mark.parametrize("case", FP16_CASES, ids=str)
def test_conv_bn_act_float16(case):
    _check_conv_bn_act(case, torch.float16, residual=True, relu=True)


def test_conv_bn_act_without_residual_or_relu():
    case = ODD[0]
    _check_conv_bn_act(case, torch.float32, residual=False, relu=False)
    _check_conv_bn_act(case, torch.float32, residual=False, relu=True)


def _check_conv_stats(case, dtype, prologue):
    x, w, _, _, _ = conv_inputs(case, dtype)
    st, pad, dil, g = _args(case)
    isc = vec(case.c, dtype, positive=True) if prologue else None
    ish = vec(case.c, dtype) if prologue else None
    relu = prologue
    z, stats = T.conv_stats(x, w, isc, ish, relu, st, pad, dil, g)
    assert stats.dtype == torch.float32 and stats.shape == (2, case.k)
    ze, se = ref.conv_stats(f64(x), f64(w), f64(isc), f64(ish), relu, st, pad, dil, g)
    if dtype == torch.float32:
        assert_matches(z, ze, dtype, what=f"z {case}")
        assert_matches(stats[0], se[0], dtype, what=f"mean {case}")
        assert_matches(stats[1], se[1], dtype, what=f"M2 {case}")
    else:
        zl, sl = ref.conv_stats(x, w, isc, ish, relu, st, pad, dil, g)
        assert_matches(z, ze, dtype, zl, what=f"z {case}")
        assert_matches(stats, se, dtype, sl, what=f"stats {case}")
    # The statistics are those of the z that was returned (as rounded): exact up to float32 sums.
    zz = z.double()
    mean = zz.mean(dim=(0, 2, 3))
    m2 = ((zz - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    assert_matches(stats[0], mean, torch.float32, what="mean of returned z")
    assert_matches(stats[1], m2, torch.float32, what="M2 of returned z")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_stats_float32_with_prologue(case):
    _check_conv_stats(case, torch.float32, prologue=True)


@pytest.mark.parametrize("case", [SMALL_RESNET[1], ODD[1]], ids=str)
def test_conv_stats_float32_without_prologue(case):
    _check_conv_stats(case, torch.float32, prologue=False)


@pytest.mark.parametrize("case", FP16_CASES, ids=str)
def test_conv_stats_float16(case):
    _check_conv_stats(case, torch.float16, prologue=True)


def test_prologue_padding_is_zero_after_the_transform():
    """A padded pixel contributes 0, not relu(0 * scale + shift) = shift (shift > 0 here)."""
    case = ConvCase(1, 4, 3, 3, 4, padding=1)
    x, w, _, _, _ = conv_inputs(case)
    isc = torch.ones(4)
    ish = torch.full((4,), 3.0)
    z, _ = T.conv_stats(x, w, isc, ish, True, [1, 1], [1, 1], [1, 1], 1)
    ze, _ = ref.conv_stats(f64(x), f64(w), f64(isc), f64(ish), True, (1, 1), (1, 1), (1, 1), 1)
    assert_matches(z, ze, torch.float32)
    wrong = torch.nn.functional.conv2d(torch.nn.functional.pad(f64(x), (1, 1, 1, 1)) + 3.0, f64(w))
    assert (z.double() - wrong).abs().max() > 1.0  # the two rules really differ on this input


@pytest.mark.parametrize("offset,spread", [(1e3, 1.0), (-2e4, 3.0), (5e2, 0.05)])
def test_stats_accurate_when_mean_dominates(offset, spread):
    """|mean| >> std (ratio 4e3..4e4): the per-16-row (hi + lo mean, M2) partials merged with
    Chan's formula keep M2 accurate (a float32 sum / sum of squares would lose every digit)."""
    n, c, h, w, k = 4, 16, 12, 12, 8
    x = rand(n, c, h, w, scale=spread, offset=offset)
    wt = (torch.full((k, c, 1, 1), 1.0 / c, dtype=torch.float64)
          * (1 + 0.01 * torch.randn(k, 1, 1, 1, dtype=torch.float64))).float()
    z, stats = T.conv_stats(x, wt, None, None, False, [1, 1], [0, 0], [1, 1], 1)
    zz = z.double()
    mean = zz.mean(dim=(0, 2, 3))
    m2 = ((zz - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    assert (mean.abs() / (m2 / (n * h * w)).sqrt()).min() > 1000  # really mean-dominated
    torch.testing.assert_close(stats[0].double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats[1].double(), m2, rtol=3e-5, atol=0)


def test_results_are_bitwise_reproducible():
    case = SMALL_RESNET[3]
    x, w, s, b, _ = conv_inputs(case)
    st, pad, dil, g = _args(case)
    z1, s1 = T.conv_stats(x, w, s[:case.c], None, True, st, pad, dil, g)
    z2, s2 = T.conv_stats(x, w, s[:case.c], None, True, st, pad, dil, g)
    assert torch.equal(z1, z2) and torch.equal(s1, s2)


def test_nchw_input_is_accepted():
    case = ODD[0]
    x, w, s, b, r = conv_inputs(case, residual=True)
    st, pad, dil, g = _args(case)
    y = T.conv_bn_act(x.contiguous(), w, s, b, r.contiguous(), st, pad, dil, g, True)
    expected = ref.conv_bn_act(f64(x), f64(w), f64(s), f64(b), f64(r), st, pad, dil, g, True)
    assert_matches(y, expected, torch.float32)


def test_empty_batch_matches_reference():
    case = ConvCase(0, 4, 5, 5, 6)
    x, w, _, _, _ = conv_inputs(case)
    z, stats = T.conv_stats(x, w, None, None, False, [1, 1], [1, 1], [1, 1], 1)
    ze, se = ref.conv_stats(x, w, None, None, False, (1, 1), (1, 1), (1, 1), 1)
    assert z.shape == ze.shape
    torch.testing.assert_close(stats, se, equal_nan=True)


def test_packed_taps_path_is_the_one_taken(monkeypatch):
    """The few-channel cases above really run with PACK_S (so their reference checks cover that
    path) and the others do not; the stem-like ones pack more than one tap per K step."""
    from fused_resnet.triton import conv

    launched = spy_triton_launches(monkeypatch)
    for case in CASES:
        launched.clear()
        _check_conv_bn_act(case, torch.float32, residual=False, relu=True)
        assert [kw["PACK_S"] for k, kw in launched if k is conv.conv_kernel] == [case in PACKED], case


@pytest.mark.parametrize("case", PACKED, ids=str)
def test_packed_taps_with_prologue_and_padding(case):
    """Packed taps with the prologue: the shift makes a padded pixel's transform non-zero, so a
    wrongly masked run element (past W, or past S * C) would show."""
    x, w, _, _, _ = conv_inputs(case)
    st, pad, dil, g = _args(case)
    isc = vec(case.c, positive=True)
    ish = torch.full((case.c,), 2.0) + vec(case.c).abs()
    z, stats = T.conv_stats(x, w, isc, ish, True, st, pad, dil, g)
    ze, se = ref.conv_stats(f64(x), f64(w), f64(isc), f64(ish), True, st, pad, dil, g)
    assert_matches(z, ze, torch.float32, what=f"z {case}")
    assert_matches(stats[1], se[1], torch.float32, what=f"M2 {case}")


# ----------------------------------------------------------------------------- split-K
# Forced through FUSED_RESNET_TRITON_SPLIT_K (on a GPU the launcher chooses it from the SM count;
# under the interpreter the default is no split). 7 splits of a short loop leave some shares empty.


@pytest.mark.parametrize("split", [2, 7])
@pytest.mark.parametrize("case", [SMALL_RESNET[0], SMALL_RESNET[1], SMALL_RESNET[5], ODD[5]], ids=str)
def test_split_k_matches_reference(monkeypatch, case, split):
    from fused_resnet.triton import conv

    launched = spy_triton_launches(monkeypatch)
    monkeypatch.setenv("FUSED_RESNET_TRITON_SPLIT_K", str(split))
    _check_conv_bn_act(case, torch.float32, residual=True, relu=True)
    assert [(k, kw.get("SPLIT_K")) for k, kw in launched] == [(conv.conv_kernel, split),
                                                              (conv.splitk_epilogue_kernel, split)]
    _check_conv_stats(case, torch.float32, prologue=True)
    if case is SMALL_RESNET[0]:
        _check_conv_bn_act(case, torch.float16, residual=False, relu=False)


def test_split_k_stats_stay_accurate_when_mean_dominates(monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_TRITON_SPLIT_K", "3")
    test_stats_accurate_when_mean_dominates(1e3, 1.0)


def test_split_k_is_deterministic_and_close_to_unsplit(monkeypatch):
    case = ODD[5]  # C = 33: three channel blocks per tap, 9 loop steps
    x, w, s, b, r = conv_inputs(case, residual=True)
    st, pad, dil, g = _args(case)
    y1 = T.conv_bn_act(x, w, s, b, r, st, pad, dil, g, True)
    monkeypatch.setenv("FUSED_RESNET_TRITON_SPLIT_K", "4")
    y4 = T.conv_bn_act(x, w, s, b, r, st, pad, dil, g, True)
    assert torch.equal(y4, T.conv_bn_act(x, w, s, b, r, st, pad, dil, g, True))
    torch.testing.assert_close(y4, y1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("raw", ["0", "-2", "two"])
def test_split_k_env_is_validated(monkeypatch, raw):
    monkeypatch.setenv("FUSED_RESNET_TRITON_SPLIT_K", raw)
    x, w, s, b, _ = conv_inputs(ODD[0])
    with pytest.raises(ValueError, match="FUSED_RESNET_TRITON_SPLIT_K: expected 'auto' or a positive integer"):
        T.conv_bn_act(x, w, s, b, None, *_args(ODD[0]), True)
