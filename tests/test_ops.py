"""The registered ops themselves (torch.ops.fused_resnet.*): opcheck (schema, fake kernels,
autograd registration, AOT dispatch), autocast, determinism, layouts, empty batches."""

from __future__ import annotations

import pytest
import torch
from conftest import ConvCase, conv_inputs, f64, rand, requires_c, vec

from fused_resnet import functional as FF
from fused_resnet import reference as ref

pytestmark = requires_c

ops = torch.ops.fused_resnet if hasattr(torch.ops, "fused_resnet") else None
CONV = ([1, 1], [1, 1], [1, 1], 1)


def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_conv_bn_act(residual, grad):
    x, w, s, b, r = conv_inputs(ConvCase(2, 4, 5, 5, 6), residual=residual)
    if grad:
        x, w, s, b = (t.requires_grad_(True) for t in (x, w, s, b))
    _opcheck(ops.conv_bn_act.default, (x, w, s, b, r, *CONV, True))


@pytest.mark.parametrize("prologue", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_conv_stats(prologue, grad):
    x, w, _, _, _ = conv_inputs(ConvCase(2, 4, 5, 5, 6))
    s, b = (vec(4, positive=True), vec(4)) if prologue else (None, None)
    if grad:
        x, w = x.requires_grad_(True), w.requires_grad_(True)
        s = s.requires_grad_(True) if s is not None else None
    _opcheck(ops.conv_stats.default, (x, w, s, b, prologue, [2, 2], [1, 1], [1, 1], 1))


@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_bn_finalize(grad):
    stats = torch.stack([torch.randn(5), torch.rand(5) * 10 + 1])
    g, b = vec(5, positive=True), vec(5)
    if grad:
        stats, g, b = (t.requires_grad_(True) for t in (stats, g, b))
    _opcheck(ops.bn_finalize.default, (stats, 12, g, b, 1e-5))
    _opcheck(ops.bn_finalize.default, (stats, 12, None, None, 1e-3))


def test_opcheck_bn_update_running_stats():
    stats = torch.stack([torch.randn(5), torch.rand(5) * 10 + 1])
    _opcheck(ops.bn_update_running_stats.default,
             (stats, 12, torch.randn(5), torch.rand(5) + 0.5, torch.tensor(3), 0.1))
    _opcheck(ops.bn_update_running_stats.default,
             (stats, 12, torch.randn(5), torch.rand(5) + 0.5, torch.tensor(3), None))


@pytest.mark.parametrize("nbt", [False, True])
@pytest.mark.parametrize("grad_mode", ["no_grad", "enable_grad", "inference_mode"])
def test_bn_update_running_stats_bumps_versions(nbt, grad_mode):
    """The op writes its buffers through data pointers; it must bump their version counters as an
    in-place ATen op does (the modules' fold cache keys on ``_version``: without the bump an eval
    after more training reused the folds of the previous eval)."""
    stats = torch.stack([torch.randn(5), torch.rand(5) * 10 + 1])
    ctx = {"no_grad": torch.no_grad, "enable_grad": torch.enable_grad, "inference_mode": torch.inference_mode}
    with ctx[grad_mode]():
        rm, rv = torch.randn(5), torch.rand(5) + 0.5
        n = torch.tensor(3) if nbt else None
        before = [t._version if not t.is_inference() else None for t in (rm, rv)]
        ops.bn_update_running_stats.default(stats, 12, rm, rv, n, None if nbt else 0.1)
        if grad_mode == "inference_mode":
            assert rm.is_inference()  # no version counter to check; the call must simply work
            return
        assert [rm._version, rv._version] == [v + 1 for v in before]
        if nbt:
            assert n._version == 1 and int(n) == 4


@pytest.mark.parametrize("mode", ["plain", "residual", "dual"])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_bn_add_act_and_backward(mode, grad):
    z = rand(2, 6, 3, 4)
    r = rand(2, 6, 3, 4) if mode != "plain" else None
    rs, rb = (vec(6), vec(6)) if mode == "dual" else (None, None)
    s, b = vec(6), vec(6)
    _opcheck(ops.bn_add_act_backward.default, (rand(2, 6, 3, 4), z, s, b, r, rs, rb, True))
    if grad:
        z, s, b = (t.requires_grad_(True) for t in (z, s, b))
        r = r.requires_grad_(True) if r is not None else None
        rs = rs.requires_grad_(True) if rs is not None else None
    _opcheck(ops.bn_add_act.default, (z, s, b, r, rs, rb, True))


def test_opcheck_stats_backward():
    z = rand(2, 6, 3, 4)
    stats = torch.stack([torch.randn(6), torch.rand(6) * 10 + 1])
    _opcheck(ops.stats_backward.default, (rand(2, 6, 3, 4), torch.randn(2, 6), z, stats, 24))


def _finalize_backward_inputs(k=6, dtype=torch.float32, gamma=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    stats = torch.stack([torch.randn(k, generator=g) * 3, torch.rand(k, generator=g) * 10 + 1]).to(dtype)
    gam = (torch.rand(k, generator=g) + 0.5).to(dtype) if gamma else None
    beta = torch.randn(k, generator=g).to(dtype)
    gs, gb = torch.randn(k, generator=g).to(dtype), torch.randn(k, generator=g).to(dtype)
    return stats, gam, beta, gs, gb


@pytest.mark.parametrize("which", ["both", "scale_only", "shift_only", "no_gamma"])
def test_opcheck_bn_finalize_backward(which):
    stats, gam, beta, gs, gb = _finalize_backward_inputs(gamma=which != "no_gamma")
    scale, shift, mean, invstd = ops.bn_finalize(stats, 24, gam, beta, 1e-5)
    gs = None if which == "shift_only" else gs
    gb = None if which == "scale_only" else gb
    gm, gi = (torch.randn(6), torch.randn(6)) if which == "both" else (None, None)
    _opcheck(ops.bn_finalize_backward.default, (gs, gb, gm, gi, gam, scale, mean, invstd, 24))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [True, False])
def test_bn_finalize_backward_matches_autograd_of_the_reference(dtype, gamma):
    """The kernel against autograd through reference.bn_finalize in float64, at a real width."""
    k, count = 256, 8 * 28 * 28
    stats, gam, beta, gs, gb = _finalize_backward_inputs(k, dtype, gamma, seed=3)
    scale, shift, mean, invstd = ops.bn_finalize(stats, count, gam, beta, 1e-5)
    gm, gi = torch.randn(k, dtype=dtype), torch.randn(k, dtype=dtype)
    got_stats, got_gamma = ops.bn_finalize_backward(gs, gb, gm, gi, gam, scale, mean, invstd, count)
    st64 = stats.double().requires_grad_()
    g64 = gam.double().requires_grad_() if gamma else None
    sc, sh, m, inv = ref.bn_finalize(st64, count, g64, beta.double(), 1e-5)
    loss = sum((out * g.double()).sum() for out, g in ((sc, gs), (sh, gb), (m, gm), (inv, gi)))
    want = torch.autograd.grad(loss, [st64] + ([g64] if gamma else []))
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_stats.double(), want[0], **tol)
    if gamma:
        torch.testing.assert_close(got_gamma.double(), want[1], **tol)


def test_bn_finalize_backward_rejects_bad_vectors():
    stats, gam, beta, gs, gb = _finalize_backward_inputs()
    scale, shift, mean, invstd = ops.bn_finalize(stats, 24, gam, beta, 1e-5)
    with pytest.raises(RuntimeError, match="grad_shift"):
        ops.bn_finalize_backward(gs, gb[:4], None, None, gam, scale, mean, invstd, 24)
    with pytest.raises(RuntimeError, match="grad_invstd"):
        ops.bn_finalize_backward(gs, gb, None, torch.randn(3), gam, scale, mean, invstd, 24)
    with pytest.raises(RuntimeError, match="invstd"):
        ops.bn_finalize_backward(gs, gb, None, None, gam, scale, mean, invstd.double(), 24)
    with pytest.raises(RuntimeError, match="count"):
        ops.bn_finalize_backward(gs, gb, None, None, gam, scale, mean, invstd, 0)


def test_compiled_kernels_registered_for_cpu():
    for name in ("conv_bn_act", "conv_bn_act_residual_", "conv_stats", "bn_finalize", "bn_update_running_stats",
                 "bn_add_act", "bn_add_act_backward", "stats_backward", "bn_finalize_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{name}", "CPU"), name


@pytest.mark.parametrize("layout", ["nchw", "noncontiguous"])
def test_any_input_layout_gives_the_same_answer(layout):
    case = ConvCase(2, 8, 6, 6, 8)
    x, w, s, b, r = conv_inputs(case, residual=True)
    expected = FF.conv_bn_act(x, w, s, b, r, padding=1, backend="cpu")
    if layout == "nchw":
        x2, r2 = x.contiguous(), r.contiguous()
    else:  # every other column of a wider tensor
        wide = torch.randn(2, 8, 6, 12)
        wide[..., ::2] = x
        x2 = wide[..., ::2]
        r2 = r.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x2.is_contiguous(memory_format=torch.channels_last)
    y = FF.conv_bn_act(x2, w, s, b, r2, padding=1, backend="cpu")
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_statistics_deterministic_across_thread_counts():
    case = ConvCase(4, 32, 16, 16, 32)
    x, w, _, _, _ = conv_inputs(case)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        z1, s1 = ops.conv_stats(x, w, None, None, False, *CONV)
        torch.set_num_threads(max(old, 2))
        z2, s2 = ops.conv_stats(x, w, None, None, False, *CONV)
    finally:
        torch.set_num_threads(old)
    if torch.equal(z1, z2):  # same convolution output -> bitwise the same statistics
        assert torch.equal(s1, s2)
    g = rand(*z1.shape)
    sc, sh = vec(32), vec(32)
    torch.set_num_threads(1)
    try:
        a = ops.bn_add_act_backward(g, z1, sc, sh, None, None, None, True)
    finally:
        torch.set_num_threads(old)
    b = ops.bn_add_act_backward(g, z1, sc, sh, None, None, None, True)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_empty_batch():
    case = ConvCase(0, 4, 5, 5, 6)
    x, w, s, b, _ = conv_inputs(case)
    y = ops.conv_bn_act(x, w, s, b, None, *CONV, True)
    assert y.shape == (0, 6, 5, 5)
    z, stats = ops.conv_stats(x, w, s.new_ones(4), None, True, *CONV)
    ez, estats = ref.conv_stats(x, w, s.new_ones(4), None, True, *CONV)
    assert z.shape == ez.shape == (0, 6, 5, 5)
    assert torch.isnan(stats[0]).all() and torch.isnan(estats[0]).all()
    assert (stats[1] == 0).all()


def test_nan_and_inf_propagate_like_pytorch():
    case = ConvCase(1, 3, 4, 4, 2)
    x, w, s, b, _ = conv_inputs(case)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 2, 2] = float("inf")
    y = ops.conv_bn_act(x, w, s, b, None, *CONV, False)
    e = ref.conv_bn_act(x, w, s, b, None, *CONV, False)
    torch.testing.assert_close(y, e, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_activations_keeps_vectors(dtype):
    """Under CPU autocast the result dtype is what torchvision's conv -> bn -> relu gives."""
    case = ConvCase(2, 8, 6, 6, 8)
    x, w, s, b, r = conv_inputs(case, residual=True)
    with torch.autocast("cpu", dtype=dtype):
        y = ops.conv_bn_act(x, w, s, b, r, *CONV, True)
        z, stats = ops.conv_stats(x, w, s.new_ones(8), None, True, *CONV)
        t = torch.nn.functional.conv2d(x, w, padding=1)
    assert y.dtype == z.dtype == t.dtype == dtype
    assert stats.dtype == torch.float32
    expected = ref.conv_bn_act(x.to(dtype), w.to(dtype), s, b, r.to(dtype), *CONV, True)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


def test_torch_compile_fullgraph_no_graph_breaks():
    case = ConvCase(2, 8, 6, 6, 8)
    x, w, s, b, r = conv_inputs(case, residual=True)

    def block(x, w, s, b, r):
        z, stats = FF.conv_stats(x, w, s, b, True, padding=1, backend="cpu")
        sc, sh, _, _ = FF.bn_finalize(stats, z.numel() // 8, backend="cpu")
        return FF.bn_add_act(z, sc, sh, r, backend="cpu")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, s, b, r), block(x, w, s, b, r))
    y = FF.conv_bn_act(x, w, s, b, r, padding=1)
    cy = torch.compile(lambda *a: FF.conv_bn_act(*a, padding=1, backend="cpu"), fullgraph=True,
                       backend="aot_eager")(x, w, s, b, r)
    torch.testing.assert_close(cy, y)


def test_bad_input_reaches_torch_check_with_a_clear_message():
    """Direct op calls (bypassing the Python checks) fail in TORCH_CHECK, naming the argument."""
    x, w, s, b, _ = conv_inputs(ConvCase(2, 4, 5, 5, 6))
    with pytest.raises(RuntimeError, match="scale"):
        ops.conv_bn_act(x, w, s[:3], b, None, *CONV, True)
    with pytest.raises(RuntimeError, match="4-D"):
        ops.conv_bn_act(x[0], w, s, b, None, *CONV, True)
    with pytest.raises(RuntimeError, match="stride"):
        ops.conv_bn_act(x, w, s, b, None, [0, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="groups"):
        ops.conv_bn_act(x, w, s, b, None, *CONV[:3], 3, True)
    with pytest.raises(RuntimeError, match="shift"):
        ops.conv_bn_act(x, w, s, b.half(), None, *CONV, True)
    with pytest.raises(RuntimeError, match="weight"):
        ops.conv_bn_act(x, w.double(), s, b, None, *CONV, True)
    with pytest.raises(RuntimeError, match="stats"):
        ops.bn_finalize(torch.randn(3, 6), 10, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="count"):
        ops.bn_update_running_stats(torch.randn(2, 6), 1, torch.zeros(6), torch.ones(6), None, 0.1)


def test_float64_gradcheck_through_compiled_ops():
    case = ConvCase(1, 3, 4, 4, 2)
    x, w, s, b, r = (None if t is None else f64(t).requires_grad_(True)
                     for t in conv_inputs(case, residual=True))
    fn = lambda x, w, s, b, r: FF.conv_bn_act(x, w, s, b, r, padding=1, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, s, b, r))

    def chain(x, w, s, b):
        z, st = FF.conv_stats(x, w, s, b, True, padding=1, backend="cpu")
        sc, sh, _, _ = FF.bn_finalize(st, z.numel() // 2, backend="cpu")
        return FF.bn_add_act(z, sc, sh, backend="cpu")

    s_in, b_in = f64(vec(3, positive=True)).requires_grad_(True), f64(vec(3)).requires_grad_(True)
    assert torch.autograd.gradcheck(chain, (x, w, s_in, b_in))

    def with_affine(st, gamma, beta):  # bn_finalize's backward kernel with gamma and beta
        sc, sh, _, _ = FF.bn_finalize(st, 40, gamma, beta, backend="cpu")
        return sc, sh

    st = torch.stack([torch.randn(5), torch.rand(5) * 3 + 1]).double().requires_grad_(True)
    gamma, beta = f64(vec(5, positive=True)).requires_grad_(True), f64(vec(5)).requires_grad_(True)
    assert torch.autograd.gradcheck(with_affine, (st, gamma, beta))
