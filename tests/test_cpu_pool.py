"""The CPU output pool (csrc/cpu/pool.cpp): large outputs of the CPU training kernels
(bn_add_act, its backward, stats_backward, the conv_stats prologue) come from recycled,
already-faulted buffers.

What could go wrong, and is checked here against the float64 reference on fresh random inputs:
a recycled buffer's old contents leaking into a result (a kernel that does not overwrite every
element), a buffer handed out while a live tensor still uses it, the bounds not holding, the off
switch, threads, and pooled tensors behaving unlike ordinary tensors."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import assert_matches, f64, rand, requires_c, vec

from fused_resnet import backends
from fused_resnet import functional as FF
from fused_resnet import reference as ref

pytestmark = [
    requires_c,
    pytest.mark.skipif("hits" not in backends.cpu_pool_stats(),
                       reason="fused_resnet._C predates csrc/cpu/pool.cpp: rebuild"),
    pytest.mark.filterwarnings("error:fused_resnet:UserWarning"),
]

BIG = (4, 64, 32, 32)  # float32: exactly 1 MiB, the smallest size the pool serves
ODD = (3, 72, 35, 29)  # float32: 0.84 MiB, below it
ODD_BIG = (5, 72, 35, 29)  # float32: 1.39 MiB, odd sizes


def _cl(*shape):
    return rand(*shape).contiguous(memory_format=torch.channels_last)


def _inputs(shape, residual=True, dual=False):
    k = shape[1]
    z, s, b = _cl(*shape), vec(k, torch.float32, "cpu", positive=True), vec(k, torch.float32, "cpu")
    r = _cl(*shape) if residual else None
    rs = vec(k, torch.float32, "cpu", positive=True) if dual else None
    rb = vec(k, torch.float32, "cpu") if dual else None
    return z, s, b, r, rs, rb


def _call(args, relu=True):
    return FF.bn_add_act(*args, relu=relu, backend="cpu")


def _expected(args, relu=True):
    return ref.bn_add_act(*(f64(t) for t in args), relu=relu)


def _nbytes(t):
    return t.numel() * t.element_size()


@pytest.fixture(autouse=True)
def _fresh_pool(monkeypatch):
    monkeypatch.delenv("FUSED_RESNET_CPU_POOL", raising=False)
    monkeypatch.delenv("FUSED_RESNET_CPU_POOL_MB", raising=False)
    backends.empty_cpu_pool()
    yield
    backends.empty_cpu_pool()


@pytest.mark.parametrize("residual,dual,relu", [(True, False, True), (True, True, True), (False, False, False),
                                                (True, True, False)])
@pytest.mark.parametrize("shape", [BIG, ODD_BIG], ids=str)
def test_recycled_buffer_contents_never_leak(shape, residual, dual, relu):
    """A pooled output is overwritten with NaN and freed; the next call of that size gets the same
    buffer back (checked by address) and must still equal the reference."""
    args = _inputs(shape, residual, dual)
    y1 = _call(args, relu)
    assert _nbytes(y1) >= 1 << 20
    addr = y1.data_ptr()
    y1.fill_(float("nan"))
    del y1
    before = backends.cpu_pool_stats()
    assert before["idle_buffers"] >= 1
    args = _inputs(shape, residual, dual)
    y2 = _call(args, relu)
    assert y2.data_ptr() == addr, "the freed buffer was not reused"
    assert backends.cpu_pool_stats()["hits"] == before["hits"] + 1
    assert y2.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y2, _expected(args, relu), torch.float32)


def test_backward_outputs_from_recycled_buffers():
    """bn_add_act's backward (grad_z, grad_residual) into NaN-filled recycled buffers."""
    args = _inputs(ODD_BIG, residual=True, dual=True)
    g = _cl(*ODD_BIG)
    junk = [_call(args) for _ in range(4)]  # four 1.39 MiB buffers, then poisoned and freed
    for j in junk:
        j.fill_(float("nan"))
    del junk, j
    leaves = [t.detach().clone().requires_grad_(True) for t in args]
    _call(leaves).backward(g)
    refs = [f64(t).requires_grad_(True) for t in args]
    ref.bn_add_act(*refs).backward(f64(g))
    assert backends.cpu_pool_stats()["hits"] >= 2
    for got, want in zip(leaves, refs, strict=True):
        assert_matches(got.grad, want.grad, torch.float32)


def test_live_buffers_are_not_shared():
    args = _inputs(BIG)
    outs = [_call(args) for _ in range(3)]
    assert len({o.data_ptr() for o in outs}) == 3, "a live output's buffer was handed out again"
    e = _expected(args)
    for o in outs:
        assert_matches(o, e, torch.float32)


def test_small_outputs_and_off_switch_bypass_the_pool(monkeypatch):
    args = _inputs(ODD)
    before = backends.cpu_pool_stats()
    _call(args)  # result dropped at once: only the allocation matters
    after = backends.cpu_pool_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])

    monkeypatch.setenv("FUSED_RESNET_CPU_POOL", "0")
    assert backends.cpu_pool_stats()["enabled"] is False
    args = _inputs(BIG)
    y = _call(args)
    del y
    off = backends.cpu_pool_stats()
    assert (off["hits"], off["misses"], off["idle_buffers"]) == (after["hits"], after["misses"], 0)
    assert_matches(_call(args), _expected(args), torch.float32)


def test_limit_and_empty(monkeypatch):
    args = _inputs(BIG)
    monkeypatch.setenv("FUSED_RESNET_CPU_POOL_MB", "0")  # nothing may stay idle
    y = _call(args)
    del y
    assert backends.cpu_pool_stats()["idle_bytes"] == 0
    monkeypatch.setenv("FUSED_RESNET_CPU_POOL_MB", "3")  # room for three 1 MiB buffers, not four
    ys = [_call(args) for _ in range(4)]
    assert _nbytes(ys[0]) == 1 << 20
    del ys
    st = backends.cpu_pool_stats()
    assert st["idle_buffers"] == 3 and st["idle_bytes"] == 3 << 20
    assert st["limit_bytes"] == 3 << 20 and st["evictions"] >= 1
    assert backends.empty_cpu_pool() == st["idle_bytes"]
    assert backends.cpu_pool_stats()["idle_bytes"] == 0


def test_pooled_output_is_an_ordinary_tensor():
    args = _inputs(BIG)
    y = _call(args)
    e = _expected(args)
    assert torch.isfinite((y * 2).sum())
    assert torch.equal(torch.from_numpy(y.numpy()), y)
    yc = y.clone()
    y.share_memory_()  # moves the data into shared memory (the pooled buffer goes back to the pool)
    assert y.is_shared() and torch.equal(y, yc)
    del y
    assert_matches(yc, e, torch.float32)
    y = _call(args)
    with pytest.raises(RuntimeError, match="resiz"):
        y.resize_(y.numel() * 2)


def test_threads_share_the_pool():
    """Eight threads allocate, check, poison and free pooled outputs of two sizes concurrently."""
    shapes = [BIG, ODD_BIG]
    inputs = {s: _inputs(s, dual=True) for s in shapes}
    expected = {s: _expected(inputs[s]) for s in shapes}
    errors = []

    def work(i):
        try:
            for j in range(6):
                s = shapes[(i + j) % 2]
                y = _call(inputs[s])
                assert_matches(y, expected[s], torch.float32)
                y.fill_(float("nan"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
