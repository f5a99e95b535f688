"""The CPU output pool (csrc/cpu/pool.cpp): large conv_bn_act outputs come from recycled,
already-faulted buffers, written in place by oneDNN's in-place overload on top of zeros or a copy
of the residual.

What could go wrong, and is checked here against the float64 reference on fresh random inputs:
a recycled buffer's old contents leaking into the result (the in-place "sum" post-op adds what the
buffer holds), the residual being overwritten, a buffer handed out while a live tensor still uses
it, the bounds not holding, and the off switch."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import ConvCase, assert_matches, conv_inputs, f64, requires_c

from fused_resnet import backends
from fused_resnet import functional as FF
from fused_resnet import reference as ref

pytestmark = [
    requires_c,
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"),
    pytest.mark.skipif("enabled" not in backends.cpu_pool_stats() or "hits" not in backends.cpu_pool_stats(),
                       reason="fused_resnet._C predates csrc/cpu/pool.cpp: rebuild"),
    pytest.mark.filterwarnings("error:fused_resnet:UserWarning"),
]

# Output 4 x 64 x 32 x 32 float32 = 1 MiB: the smallest size the pool serves.
BIG = ConvCase(4, 32, 32, 32, 64)
BIG_DOWN = ConvCase(4, 48, 65, 63, 96, stride=2)  # odd sizes, stride 2: 4 x 96 x 33 x 32 x 4 B = 1.6 MB
SMALL = ConvCase(2, 16, 8, 8, 16)


def _call(x, w, s, b, r, case, relu=True):
    return FF.conv_bn_act(x, w, s, b, r, relu=relu, backend="cpu", **case.conv_args)


def _pairs(case):
    return dict(stride=(case.stride,) * 2, padding=(case.padding,) * 2, dilation=(case.dilation,) * 2,
                groups=case.groups)


def _expected(x, w, s, b, r, case, relu=True):
    return ref.conv_bn_act(f64(x), f64(w), f64(s), f64(b), f64(r), relu=relu, **_pairs(case))


def _nbytes(t):
    return t.numel() * t.element_size()


@pytest.fixture(autouse=True)
def _fresh_pool(monkeypatch):
    monkeypatch.delenv("FUSED_RESNET_CPU_POOL", raising=False)
    monkeypatch.delenv("FUSED_RESNET_CPU_POOL_MB", raising=False)
    backends.empty_cpu_pool()
    yield
    backends.empty_cpu_pool()


@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (False, False), (True, False)])
def test_recycled_buffer_contents_never_leak(residual, relu):
    """A pooled output is overwritten with NaN and freed; the next call of that size gets the same
    buffer back (checked by address) and must still equal the reference."""
    x, w, s, b, r = conv_inputs(BIG, residual=residual)
    y1 = _call(x, w, s, b, r, BIG, relu)
    assert _nbytes(y1) >= 1 << 20
    addr = y1.data_ptr()
    y1.fill_(float("nan"))
    del y1
    before = backends.cpu_pool_stats()
    assert before["idle_buffers"] >= 1
    x2, w2, s2, b2, r2 = conv_inputs(BIG, residual=residual)
    y2 = _call(x2, w2, s2, b2, r2, BIG, relu)
    assert y2.data_ptr() == addr, "the freed buffer was not reused"
    assert backends.cpu_pool_stats()["hits"] == before["hits"] + 1
    assert y2.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y2, _expected(x2, w2, s2, b2, r2, BIG, relu), torch.float32)


def test_residual_is_not_modified_and_live_buffers_are_not_shared():
    x, w, s, b, r = conv_inputs(BIG, residual=True)
    r_before = r.clone()
    outs = [_call(x, w, s, b, r, BIG) for _ in range(3)]
    assert torch.equal(r, r_before)
    assert len({o.data_ptr() for o in outs}) == 3, "a live output's buffer was handed out again"
    e = _expected(x, w, s, b, r, BIG)
    for o in outs:
        assert_matches(o, e, torch.float32)


def test_small_outputs_and_off_switch_bypass_the_pool(monkeypatch):
    x, w, s, b, r = conv_inputs(SMALL, residual=True)
    before = backends.cpu_pool_stats()
    y = _call(x, w, s, b, r, SMALL)
    del y
    after = backends.cpu_pool_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])

    monkeypatch.setenv("FUSED_RESNET_CPU_POOL", "0")
    assert backends.cpu_pool_stats()["enabled"] is False
    x, w, s, b, r = conv_inputs(BIG, residual=True)
    y = _call(x, w, s, b, r, BIG)
    del y
    off = backends.cpu_pool_stats()
    assert (off["hits"], off["misses"], off["idle_buffers"]) == (after["hits"], after["misses"], 0)
    x, w, s, b, r = conv_inputs(BIG, residual=True)
    assert_matches(_call(x, w, s, b, r, BIG), _expected(x, w, s, b, r, BIG), torch.float32)


def test_limit_and_empty(monkeypatch):
    x, w, s, b, _ = conv_inputs(BIG)
    monkeypatch.setenv("FUSED_RESNET_CPU_POOL_MB", "0")  # nothing may stay idle
    del _
    y = _call(x, w, s, b, None, BIG)
    del y
    assert backends.cpu_pool_stats()["idle_bytes"] == 0
    monkeypatch.setenv("FUSED_RESNET_CPU_POOL_MB", "3")  # room for two 1 MiB buffers, not four
    ys = [_call(x, w, s, b, None, BIG) for _ in range(4)]
    nbytes = _nbytes(ys[0])
    del ys
    st = backends.cpu_pool_stats()
    assert st["idle_buffers"] == 3 * (1 << 20) // nbytes and st["idle_bytes"] <= 3 << 20
    assert st["limit_bytes"] == 3 << 20 and st["evictions"] >= 1
    assert backends.empty_cpu_pool() == st["idle_bytes"]
    assert backends.cpu_pool_stats()["idle_bytes"] == 0


def test_pooled_output_is_an_ordinary_tensor():
    x, w, s, b, r = conv_inputs(BIG, residual=True)
    y = _call(x, w, s, b, r, BIG)
    e = _expected(x, w, s, b, r, BIG)
    z = (y * 2).sum()  # ops, views, clone, numpy round trip
    assert torch.isfinite(z)
    assert torch.equal(torch.from_numpy(y.numpy()), y)
    yc = y.clone()
    y.share_memory_()  # moves the data into shared memory (the pooled buffer goes back to the pool)
    assert y.is_shared() and torch.equal(y, yc)
    del y
    assert_matches(yc, e, torch.float32)
    y = _call(x, w, s, b, r, BIG)
    with pytest.raises(RuntimeError, match="resiz"):
        y.resize_(y.numel() * 2)


def test_autograd_through_pooled_output():
    x, w, s, b, r = conv_inputs(BIG, residual=True)
    for t in (x, w, r):
        t.requires_grad_(True)
    _call(x, w, s, b, r, BIG).square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, r)]
    for t in (x, w, r):
        t.grad = None
    xd, wd, rd = (t.detach().double().requires_grad_(True) for t in (x, w, r))
    ref.conv_bn_act(xd, wd, s.double(), b.double(), rd, **_pairs(BIG)).square().sum().backward()
    for g, gd in zip(grads, (xd.grad, wd.grad, rd.grad), strict=True):
        assert_matches(g, gd, torch.float32)


def test_threads_share_the_pool():
    """Eight threads allocate, check and free pooled outputs of two sizes concurrently."""
    cases = [BIG, BIG_DOWN]
    inputs = {c: conv_inputs(c, residual=True) for c in cases}
    expected = {c: _expected(*inputs[c], c) for c in cases}
    errors = []

    def work(i):
        try:
            for j in range(6):
                c = cases[(i + j) % 2]
                y = _call(*inputs[c], c)
                assert_matches(y, expected[c], torch.float32)
                y.fill_(float("nan"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
