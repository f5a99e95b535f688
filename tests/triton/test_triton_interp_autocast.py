"""The Triton ops under torch.autocast (CPU, float16, on the interpreter) and the packed-weight
cache seen through the conv op: output dtypes as torch's own conv gives under autocast, values
against the reference run on the autocast-cast inputs, and an in-place weight update reaching
the next call."""

from _interp import require_interpreter

require_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import ConvCase, assert_matches, conv_inputs, f64, rand, vec  # noqa: E402

from fused_resnet import reference as ref  # noqa: E402
from fused_resnet.triton import _pack, load_ops  # noqa: E402

T = load_ops()
HALF = torch.float16
CASE = ConvCase(2, 8, 6, 6, 16)  # 3x3 s1, residual-compatible
ARGS = ([1, 1], [1, 1], [1, 1], 1)


def _autocast_dtype_of_conv(x, w):
    with torch.autocast("cpu", dtype=HALF):
        return F.conv2d(x, w, padding=1).dtype


def test_conv_bn_act_under_autocast():
    x, w, s, b, r = conv_inputs(CASE, residual=True)  # all float32
    with torch.autocast("cpu", dtype=HALF):
        y = T.conv_bn_act(x, w, s, b, r, *ARGS, True)
    assert y.dtype == _autocast_dtype_of_conv(x, w) == HALF
    assert y.is_contiguous(memory_format=torch.channels_last)
    xh, wh, rh = x.to(HALF), w.to(HALF), r.to(HALF)
    expected = ref.conv_bn_act(f64(xh), f64(wh), f64(s), f64(b), f64(rh), *ARGS, True)
    lowp = ref.conv_bn_act(xh, wh, s, b, rh, *ARGS, True)
    assert_matches(y, expected, HALF, lowp, what="conv_bn_act under autocast")


def test_conv_stats_and_bn_add_act_under_autocast():
    x, w, _, _, r = conv_inputs(CASE, residual=True)
    in_scale, in_shift = vec(CASE.c, positive=True), vec(CASE.c)
    with torch.autocast("cpu", dtype=HALF):
        z, st = T.conv_stats(x, w, in_scale, in_shift, True, *ARGS)
        sc, sh, _, _ = T.bn_finalize(st, z.numel() // z.shape[1], None, None, 1e-5)
        out = T.bn_add_act(z, sc, sh, r, None, None, True)  # residual float32 -> float16
    assert z.dtype == _autocast_dtype_of_conv(x, w) == HALF
    assert st.dtype == sc.dtype == torch.float32  # statistics and per-channel vectors stay float32
    assert out.dtype == HALF
    xh, wh = x.to(HALF), w.to(HALF)
    z64, st64 = ref.conv_stats(f64(xh), f64(wh), f64(in_scale), f64(in_shift), True, *ARGS)
    zlow, _ = ref.conv_stats(xh, wh, in_scale, in_shift, True, *ARGS)
    assert_matches(z, z64, HALF, zlow, what="z under autocast")
    torch.testing.assert_close(st[0].double(), st64[0], rtol=2e-3, atol=2e-3)
    out64 = ref.bn_add_act(f64(z), f64(sc), f64(sh), f64(r.to(HALF)), None, None, True)
    assert_matches(out, out64, HALF, ref.bn_add_act(z, sc, sh, r.to(HALF), None, None, True),
                   what="bn_add_act under autocast")


def test_without_autocast_mixed_dtypes_are_refused():
    x, w, s, b, _ = conv_inputs(CASE)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float16"):
        T.conv_bn_act(x.to(HALF), w, s, b, None, *ARGS, False)


def test_packed_weight_cache_through_the_op():
    _pack.clear()
    x, w, s, b, _ = conv_inputs(CASE)
    y1 = T.conv_bn_act(x, w, s, b, None, *ARGS, False)
    T.conv_bn_act(x, w, s, b, None, *ARGS, False)
    info = _pack.cache_info()
    assert (info["hits"], info["misses"]) == (1, 1), info
    w.add_(rand(*w.shape, channels_last=False, scale=0.5))  # in place: the next call must see it
    y2 = T.conv_bn_act(x, w, s, b, None, *ARGS, False)
    expected = ref.conv_bn_act(f64(x), f64(w), f64(s), f64(b), None, *ARGS, False)
    assert_matches(y2, expected, torch.float32, what="after an in-place weight update")
    assert not torch.allclose(y1, y2)
    _pack.clear()
