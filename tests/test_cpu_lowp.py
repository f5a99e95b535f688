"""The CPU elementwise/reduction kernels in float16 and bfloat16 (csrc/cpu/lowp.h, bn.cpp, conv.cpp).

float16 rows run the float32 row bodies on float32 staging blocks, converted with F16C in the AVX2
version and with c10's conversion in the baseline one (FUSED_RESNET_CPU_AVX2=0); bfloat16 rows run
directly. Both must give exactly the bits of the former direct loops: the float math of
reference.py in float32, rounded once to nearest even. Checked three ways on fresh random inputs:
against reference.py (float64 at the usual tolerance, and bit for bit where reference.py computes
the same float32 operations), the AVX2 version against the baseline bit for bit, and every one of
the 65536 float16/bfloat16 values (NaN, inf, subnormals) through the conversions."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches, f64, requires_c

from fused_resnet import reference as ref

pytestmark = requires_c

LOWP = [torch.float16, torch.bfloat16]
_OPS = torch.ops.fused_resnet
_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
CL = torch.channels_last


def _bits(t):
    return t.view(_BITS[t.dtype])


def _assert_same_bits(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert actual.stride() == expected.stride(), f"{what}: strides {actual.stride()} != {expected.stride()}"
    same = _bits(actual) == _bits(expected)
    assert bool(same.all()), (f"{what}: {int((~same).sum())} of {same.numel()} values differ, e.g. "
                              f"{actual[~same][:4].tolist()} vs {expected[~same][:4].tolist()}")


def _every_value(dtype):
    """All 65536 bit patterns of dtype as a (1, 256, 16, 16) channels_last tensor."""
    b = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    return b.view(dtype).reshape(1, 16, 16, 256).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------ conversions
@pytest.mark.parametrize("dtype", LOWP)
def test_every_value_round_trips(monkeypatch, dtype):
    # z * 1 + 0 (no ReLU) widens every value and rounds it back: each value comes back as itself,
    # except -0 (-0 + 0 = +0 in float) and NaN, which c10's rounding makes canonical: float16
    # keeps the sign (sign | 0x7E00), bfloat16 gives 0x7FC0.
    z = _every_value(dtype)
    k = z.shape[1]
    one, zero = torch.ones(k), torch.zeros(k)
    expected = _bits(z.clone()).clone()
    expected[_bits(z) == -(2**15)] = 0  # -0 -> +0
    nan = z.isnan()
    assert int(nan.sum()) == (2046 if dtype == torch.float16 else 254)
    sign = _bits(z) < 0
    if dtype == torch.float16:
        expected[nan & ~sign] = 0x7E00
        expected[nan & sign] = 0xFE00 - 2**16  # sign | 0x7E00, as int16
    else:
        expected[nan] = 0x7FC0
    versions = [("AVX2", None), ("baseline", "0")] if _AVX2 else [("baseline", "0")]
    for name, env in versions:
        if env is None:
            monkeypatch.delenv("FUSED_RESNET_CPU_AVX2", raising=False)
        else:
            monkeypatch.setenv("FUSED_RESNET_CPU_AVX2", env)
        out = _OPS.bn_add_act(z, one, zero, None, None, None, False)
        assert torch.equal(_bits(out), expected), f"{name}: {int((_bits(out) != expected).sum())} values differ"
        # And through a second staged input: residual = z, res_scale 0 (every value * 0 is 0 or NaN).
        out = _OPS.bn_add_act(z, one, zero, z, zero, zero, False)
        nan_or_inf = nan | z.isinf()  # inf * 0 = NaN, NaN stays NaN: canonical NaN (x86 keeps the sign)
        assert torch.equal(_bits(out)[~nan_or_inf], expected[~nan_or_inf]), name
        assert bool(out[nan_or_inf].isnan().all()), name


def _ties_overflow_subnormals(dtype):
    """Every finite value of dtype times per-channel scales chosen so the float32 products land on
    round-to-nearest-even ties, overflow dtype, and fall into (and round within) its subnormals."""
    z = _every_value(dtype)
    z = torch.where(z.isfinite(), z, torch.ones((), dtype=dtype))
    mant = 10 if dtype == torch.float16 else 7  # stored mantissa bits
    # 1 + 2^-(mant+1): exact in float32, half an ulp of dtype added to every odd/even mantissa (ties);
    # 2^-3 shifts the smallest normals and subnormals below dtype's subnormal ulp (ties and
    # underflow to 0); 16 overflows the largest values; 3 and 0.1 are ordinary roundings.
    scales = torch.tensor([1 + 2.0 ** -(mant + 1), 2.0**-3, 16.0, 3.0, 0.1], dtype=torch.float64).to(torch.float32)
    k = z.shape[1]
    s = scales.repeat(k // len(scales) + 1)[:k]
    return z, s


@pytest.mark.parametrize("dtype", LOWP)
def test_rounding_is_round_to_nearest_even(monkeypatch, dtype):
    z, s = _ties_overflow_subnormals(dtype)
    b = torch.zeros(s.shape)
    # Independent oracle: the same float32 operations (z * s + 0, ReLU), computed by torch and
    # rounded by torch.
    prod = z.to(torch.float32) * s.view(-1, 1, 1)
    exact = prod + b.view(-1, 1, 1)
    expected = exact.to(dtype)
    # The inputs exercise what they claim to: ties (the value halfway between its rounding y and
    # the next dtype value 2x - y), overflow to inf, results in the subnormal range.
    wide, lo = exact.to(torch.float64), expected.to(torch.float64)
    other = 2 * wide - lo
    ties = (other.to(dtype).to(torch.float64) == other) & (other != lo) & lo.isfinite()
    assert int(ties.sum()) > 1000
    assert int(expected.isinf().sum()) > 100 and not bool(z.isinf().any())
    assert int(((wide.abs() < torch.finfo(dtype).tiny) & (wide != 0)).sum()) > 200
    versions = [None, "0"] if _AVX2 else ["0"]
    for env in versions:
        if env is None:
            monkeypatch.delenv("FUSED_RESNET_CPU_AVX2", raising=False)
        else:
            monkeypatch.setenv("FUSED_RESNET_CPU_AVX2", env)
        for relu in (False, True):
            out = _OPS.bn_add_act(z, s, b, None, None, None, relu)
            want = exact.clamp_min(0).to(dtype) if relu else expected
            _assert_same_bits(out, want, f"{dtype} relu={relu} env={env}")
            # The backward's elementwise outputs round g * scale and g * res_scale the same way
            # (pre-activation 1 + s > 0, so g = grad_out = z).
            gz, _, _, gr, _ = _OPS.bn_add_act_backward(z, torch.ones_like(z), torch.ones(s.shape), b,
                                                       torch.ones_like(z), s, None, relu)
            _assert_same_bits(gz, z, f"grad_z {dtype} env={env}")
            _assert_same_bits(gr, prod.to(dtype), f"grad_residual {dtype} env={env}")


# ------------------------------------------------------------------------------ whole kernels
def _act(g, *shape, dtype, scale=3.0, big=True):
    """Random activations with a sprinkle of (float16 and bfloat16) subnormals, signed zeros and,
    with big, values near the top of float16 (their outputs may overflow to inf)."""
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    flat = t.view(-1)
    n = flat.numel()
    idx = torch.randperm(n, generator=g)[: max(n // 50, 4)]
    special = [3e-6, -4e-7, 6e-8, 1e-39, -2e-40, 0.0, -0.0] + ([2e4, -3e4] if big else [])
    special = torch.tensor(special, dtype=torch.float64)
    flat[idx] = special[torch.arange(idx.numel()) % special.numel()]
    return t.to(dtype).contiguous(memory_format=CL)


def _vec(g, k, positive=False):
    t = torch.randn(k, generator=g, dtype=torch.float64)
    return (t.abs() + 0.5 if positive else t).to(torch.float32)


def _inputs(dtype, k, n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    z, go, r = (_act(g, n, k, h, w, dtype=dtype) for _ in range(3))
    x = _act(g, n, 5, h, w, dtype=dtype, scale=1.0, big=False)
    wt = (torch.randn(k, 5, 3, 3, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    vecs = dict(s=_vec(g, k, True), b=_vec(g, k), rs=_vec(g, k, True), rb=_vec(g, k), in_s=_vec(g, 5, True),
                in_b=_vec(g, 5), a=_vec(g, k), m2=_vec(g, k, True), gs=_vec(g, k), gm2=_vec(g, k))
    return z, go, r, x, wt, vecs


# (residual, res_scale, res_shift) present?
_RES = [(False, False, False), (True, False, False), (True, True, True), (True, True, False), (True, False, True)]
_PAIRS = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1])
_GEOMETRY = (_PAIRS["stride"], _PAIRS["padding"], _PAIRS["dilation"])


def _all_outputs(z, go, r, x, wt, v):
    """name -> every output of every kernel, for each residual variant, relu on/off and prologue."""
    out = {}
    n, _, h, w = z.shape
    for res, has_rs, has_rb in _RES:
        rr, rs, rb = (r if res else None), (v["rs"] if has_rs else None), (v["rb"] if has_rb else None)
        for relu in (True, False):
            tag = f"res={res} rs={has_rs} rb={has_rb} relu={relu}"
            out[f"bn_add_act {tag}"] = (_OPS.bn_add_act(z, v["s"], v["b"], rr, rs, rb, relu),)
            out[f"bn_add_act_backward {tag}"] = _OPS.bn_add_act_backward(go, z, v["s"], v["b"], rr, rs, rb, relu)
    stats = torch.stack([v["a"], v["m2"]])
    out["stats_backward"] = (_OPS.stats_backward(go, torch.stack([v["gs"], v["gm2"]]), z, stats, n * h * w),)
    for layout in ("channels_last", "nchw"):
        xl = x if layout == "channels_last" else x.contiguous()
        for pro in ((None, None, False), (v["in_s"], v["in_b"], True), (v["in_s"], None, False), (None, None, True)):
            out[f"conv_stats {layout} prologue={[p is not None for p in pro[:2]] + [pro[2]]}"] = _OPS.conv_stats(
                xl, wt, *pro, *_GEOMETRY, 1)
    for relu in (True, False):
        out[f"conv_bn_act relu={relu}"] = (_OPS.conv_bn_act(x, wt, v["s"], v["b"], r, *_GEOMETRY, 1, relu),)
    return out


# K 3 / 13 / 67: odd channel counts (staging blocks of whole rows, vector tails); (2, 256, 28, 28):
# a ResNet-50 stage-2 BN activation at batch 2. Rows: 1800 / 1800 / 1800 / 1568 (several 256-row
# chunks, staging blocks and kSumRows blocks, and tails of each).
SHAPES = [(3, 2, 30, 30), (13, 2, 30, 30), (67, 2, 30, 30), (256, 2, 28, 28)]


@pytest.mark.skipif(not _AVX2, reason="this CPU has no AVX2: only the baseline version runs")
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"k{s[0]}")
def test_avx2_and_baseline_same_bits(monkeypatch, dtype, shape):
    k, n, h, w = shape
    args = _inputs(dtype, k, n, h, w, seed=k)
    fast = _all_outputs(*args)
    monkeypatch.setenv("FUSED_RESNET_CPU_AVX2", "0")
    base = _all_outputs(*args)
    assert fast.keys() == base.keys()
    for name in fast:
        for i, (a, e) in enumerate(zip(fast[name], base[name], strict=True)):
            if a.numel():
                _assert_same_bits(a, e, f"{name} output {i} ({dtype}, K={k})")


def _reference(dtype_in, z, go, r, x, wt, v, name):
    """reference.py's outputs for one _all_outputs entry, on inputs cast to dtype_in."""
    c = (lambda t: t) if dtype_in is None else (lambda t: None if t is None else t.to(dtype_in))
    n, _, h, w = z.shape
    if name == "stats_backward":
        return (ref.stats_backward(c(go), torch.stack([c(v["gs"]), c(v["gm2"])]), c(z),
                                   torch.stack([c(v["a"]), c(v["m2"])]), n * h * w),)
    if name.startswith("conv_bn_act"):
        return (ref.conv_bn_act(c(x), c(wt), c(v["s"]), c(v["b"]), c(r), relu=name.endswith("True"), **_PAIRS),)
    if name.startswith("conv_stats"):
        flags = name.split("prologue=")[1]
        has_s, has_b, relu = (f.strip() == "True" for f in flags.strip("[]").split(","))
        return ref.conv_stats(c(x), c(wt), c(v["in_s"]) if has_s else None, c(v["in_b"]) if has_b else None, relu,
                              **_PAIRS)
    tag = dict(kv.split("=") for kv in name.split(" ")[1:])
    rr = c(r) if tag["res"] == "True" else None
    rs = c(v["rs"]) if tag["rs"] == "True" else None
    rb = c(v["rb"]) if tag["rb"] == "True" else None
    fn = ref.bn_add_act_backward if name.startswith("bn_add_act_backward") else ref.bn_add_act
    lead = (c(go),) if fn is ref.bn_add_act_backward else ()
    res = fn(*lead, c(z), c(v["s"]), c(v["b"]), rr, rs, rb, relu=tag["relu"] == "True")
    return res if isinstance(res, tuple) else (res,)


# Outputs in the activation dtype whose reference.py formula is the kernel's float32 arithmetic
# operation for operation (so equal bits), by kernel: indices into the output tuple. conv_stats'
# z: the prologue's rounding is reference.py's and the convolution is ATen's on the same
# channels_last input (not so for an NCHW x, which reference.py convolves as NCHW).
_EXACT = {"bn_add_act": (0,), "bn_add_act_backward": (0, 3), "stats_backward": (0,), "conv_stats channels_last": (0,)}


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"k{s[0]}")
def test_kernels_match_reference(dtype, shape):
    k, n, h, w = shape
    z, go, r, x, wt, v = _inputs(dtype, k, n, h, w, seed=100 + k)
    got = _all_outputs(z, go, r, x, wt, v)
    for name, outs in got.items():
        want64 = _reference(torch.float64, z, go, r, x, wt, v, name)
        want_lowp = _reference(None, z, go, r, x, wt, v, name)
        exact = _EXACT.get(name.split(" ")[0], _EXACT.get(" ".join(name.split(" ")[:2]), ()))
        for i, (a, e64, el) in enumerate(zip(outs, want64, want_lowp, strict=True)):
            what = f"{name} output {i} ({dtype}, K={k})"
            assert a.dtype == el.dtype and a.shape == el.shape, what
            if a.numel() == 0:
                continue
            # Values that overflow the dtype (inputs near float16's top) overflow as in reference.py
            # in that dtype; the rest is compared with the float64 reference.
            assert torch.equal(a.isfinite(), el.isfinite()), what + ": overflows differ from reference.py's"
            keep = el.isfinite() & e64.isfinite()
            assert_matches(f64(a)[keep], e64[keep], dtype, lowp_reference=f64(el)[keep], what=what)
            if i in exact:
                _assert_same_bits(a, el.contiguous(memory_format=CL), what + " (bits vs reference.py in float32)")
