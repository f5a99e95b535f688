"""Triton BatchNorm kernels under the interpreter vs the reference: bn_finalize,
bn_update_running_stats, bn_add_act (with the dual-BN projection shortcut), bn_add_act_backward
and stats_backward; float32 and float16, shapes whose pixel count and channel count are not
multiples of the 16-wide interpreter tile."""

from _interp import require_interpreter

require_interpreter()

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import assert_matches, f64, rand, vec  # noqa: E402

from fused_resnet import reference as ref  # noqa: E402
from fused_resnet.triton import load_ops  # noqa: E402

T = load_ops()
SHAPES = [(2, 16, 5, 5), (1, 3, 7, 3), (3, 40, 2, 3)]


def _stats(k, count):
    mean = torch.randn(k, dtype=torch.float64) * 3
    m2 = (torch.rand(k, dtype=torch.float64) + 0.1) * count
    return torch.stack([mean, m2]).float()


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("k", [1, 3, 37])
def test_bn_finalize(k, affine):
    stats = _stats(k, 50)
    gamma = vec(k) if affine else None
    beta = vec(k) if affine else None
    out = T.bn_finalize(stats, 50, gamma, beta, 1e-5)
    expected = ref.bn_finalize(f64(stats), 50, f64(gamma), f64(beta), 1e-5)
    for name, a, e in zip(("scale", "shift", "save_mean", "save_invstd"), out, expected, strict=True):
        assert a.dtype == torch.float32
        assert_matches(a, e, torch.float32, what=name)


@pytest.mark.parametrize("momentum,nbt", [(0.1, False), (0.3, True), (None, True)])
def test_bn_update_running_stats(momentum, nbt):
    k = 21
    stats = _stats(k, 40)
    rm, rv = torch.randn(k), torch.rand(k) + 0.5
    n = torch.tensor(4, dtype=torch.int64) if nbt else None
    erm, erv = rm.double(), rv.double()
    en = n.clone() if nbt else None
    T.bn_update_running_stats(stats, 40, rm, rv, n, momentum)
    ref.bn_update_running_stats(f64(stats), 40, erm, erv, en, momentum)
    assert_matches(rm, erm, torch.float32, what="running_mean")
    assert_matches(rv, erv, torch.float32, what="running_var")
    if nbt:
        assert n.item() == en.item() == 5


def test_bn_update_running_stats_needs_counter_for_cumulative_average():
    with pytest.raises(ValueError, match="num_batches_tracked"):
        T.bn_update_running_stats(_stats(3, 9), 9, torch.zeros(3), torch.ones(3), None, None)


def _bn_inputs(shape, dtype, res, rscale, rshift):
    n, k, h, w = shape
    z = rand(*shape, dtype=dtype)
    r = rand(*shape, dtype=dtype) if res else None
    return (z, vec(k, positive=True), vec(k), r, vec(k) if rscale else None, vec(k) if rshift else None)


COMBOS = [c for c in itertools.product([False, True], repeat=3) if c[0] or not (c[1] or c[2])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("res,rscale,rshift", COMBOS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_add_act_and_backward(shape, res, rscale, rshift, dtype):
    for relu in (True, False):
        args = _bn_inputs(shape, dtype, res, rscale, rshift)
        y = T.bn_add_act(*args, relu)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        e = ref.bn_add_act(*map(f64, args), relu)
        low = ref.bn_add_act(*args, relu) if dtype != torch.float32 else None
        assert_matches(y, e, dtype, low, what="bn_add_act")

        g = rand(*shape, dtype=dtype)
        got = T.bn_add_act_backward(g, *args, relu)
        exp = ref.bn_add_act_backward(f64(g), *map(f64, args), relu)
        lowb = ref.bn_add_act_backward(g, *args, relu) if dtype != torch.float32 else [None] * 5
        names = ("grad_z", "grad_scale", "grad_shift", "grad_residual", "grad_res_scale")
        for name, a, b, lo in zip(names, got, exp, lowb, strict=True):
            assert a.shape == b.shape, name
            if a.numel():
                # vectors are float32 sums whatever the activation dtype
                d = dtype if a.dim() == 4 else torch.float32
                assert_matches(a, b, d, lo if a.dim() == 4 else None, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stats_backward(shape, dtype):
    n, k, h, w = shape
    z = rand(*shape, dtype=dtype)
    gz = rand(*shape, dtype=dtype)
    count = n * h * w
    zz = z.double()
    mean = zz.mean(dim=(0, 2, 3))
    stats = torch.stack([mean, ((zz - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))]).float()
    gs = torch.randn(2, k)
    out = T.stats_backward(gz, gs, z, stats, count)
    e = ref.stats_backward(f64(gz), f64(gs), f64(z), f64(stats), count)
    low = ref.stats_backward(gz, gs, z, stats, count) if dtype != torch.float32 else None
    assert_matches(out, e, dtype, low, what="stats_backward")


def test_nchw_inputs_are_accepted():
    args = _bn_inputs((2, 5, 3, 4), torch.float32, True, True, True)
    nchw = [a.contiguous() if (a is not None and a.dim() == 4) else a for a in args]
    y = T.bn_add_act(*nchw, True)
    assert_matches(y, ref.bn_add_act(*map(f64, args), True), torch.float32)


def test_bad_input_names_the_argument():
    z = rand(2, 4, 3, 3)
    s, b = vec(4), vec(4)
    with pytest.raises(TypeError, match="scale: expected float32"):
        T.bn_add_act(z, s.double(), b, None, None, None, True)
    with pytest.raises(ValueError, match=r"shift: expected shape \(4,\)"):
        T.bn_add_act(z, s, vec(5), None, None, None, True)
    with pytest.raises(ValueError, match="residual: expected shape"):
        T.bn_add_act(z, s, b, rand(2, 4, 3, 2), None, None, True)
    with pytest.raises(ValueError, match="res_scale, res_shift: given without a residual"):
        T.bn_add_act(z, s, b, None, s, None, True)
    with pytest.raises(TypeError, match="grad_out: expected dtype"):
        T.bn_add_act_backward(z.half(), z, s, b, None, None, None, True)
    with pytest.raises(ValueError, match=r"stats: expected shape \(2, K\)"):
        T.bn_finalize(torch.zeros(3, 4), 9, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"grad_stats: expected shape \(2, 4\)"):
        T.stats_backward(z, torch.zeros(2, 5), z, torch.zeros(2, 4), 18)
    with pytest.raises(ValueError, match="running_var"):
        T.bn_update_running_stats(torch.zeros(2, 4), 9, torch.zeros(4), torch.zeros(3), None, 0.1)
    w = rand(6, 4, 3, 3)
    with pytest.raises(ValueError, match="weight/groups"):
        T.conv_bn_act(z, w, vec(6), vec(6), None, [1, 1], [1, 1], [1, 1], 3, True)
    with pytest.raises(ValueError, match="in_scale"):
        T.conv_stats(z, w, vec(6), None, False, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(TypeError, match="x: the Triton backend expects"):
        T.conv_stats(z.double(), w.double(), None, None, False, [1, 1], [1, 1], [1, 1], 1)


def test_bn_update_running_stats_strided_buffers():
    stats = _stats(8, 30)
    base_m, base_v = torch.randn(16), torch.rand(16) + 0.5
    em, ev = base_m[::2].double(), base_v[::2].double()
    T.bn_update_running_stats(stats, 30, base_m[::2], base_v[::2], None, 0.2)
    ref.bn_update_running_stats(f64(stats), 30, em, ev, None, 0.2)
    assert_matches(base_m[::2], em, torch.float32)
    assert_matches(base_v[::2], ev, torch.float32)
