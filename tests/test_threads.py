"""Thread safety: many threads using one fused model or one op's caches at once.

What is guaranteed (and checked here):

* The folded-parameter cache (:class:`fused_resnet.nn._fusion.FoldCache`) may be used by any
  number of threads at once, in any mix of grad mode, ``no_grad`` and ``inference_mode``: no
  exception, and every call returns the model's output for the parameters it reads.
* An in-place update of BatchNorm parameters/buffers made by another thread is seen by every call
  that *starts after the update finished* (no stale fold survives, however many threads refresh
  the cache at once). A call that *overlaps* the update reads tensors while they are being written
  -- a data race in PyTorch itself (a plain ``nn.BatchNorm2d`` would read the same mix); such a call
  still completes without an exception and returns finite values, but which parameters it saw is
  unspecified. Synchronize updates with inference (a lock, or swap in an updated copy) to exclude
  that window.
* The CPU oneDNN weight cache (``conv_bn_act(backend="cpu")``, float32) serves several weights and
  input shapes to many threads at once with the reference's answer.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torchvision.models.resnet as tvr
from conftest import CL, assert_matches, f64, rand, requires_c
from torch import nn

import fused_resnet.nn as fnn
from fused_resnet import _ext
from fused_resnet import functional as FF
from fused_resnet import reference as ref

THREADS = 8
BACKEND = "cpu" if _ext.available() else "torch"


def _block_pair(seed: int):
    """A torchvision BasicBlock with a projection shortcut (the reference) and a fused block that
    adopts its very modules (so an in-place edit of a parameter reaches both)."""
    torch.manual_seed(seed)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    tv = tvr.BasicBlock(8, 16, stride=2, downsample=down).eval()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m, torch.Generator().manual_seed(seed + m.num_features))
    fused = fnn.BasicBlock.from_module(tv, backend=BACKEND).eval()
    return tv, fused


def _randomize_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)


def _bn_state(block: nn.Module) -> list[list[torch.Tensor]]:
    return [[t.detach().clone() for t in (m.weight, m.bias, m.running_mean, m.running_var)]
            for m in block.modules() if isinstance(m, nn.BatchNorm2d)]


def _load_bn_state(block: nn.Module, state) -> None:
    """In place (``copy_``), the way an optimizer step or ``load_state_dict`` updates them."""
    with torch.no_grad():
        bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
        for m, vals in zip(bns, state, strict=True):
            for t, v in zip((m.weight, m.bias, m.running_mean, m.running_var), vals, strict=True):
                t.copy_(v)


def _run(block, x, mode: str) -> torch.Tensor:
    if mode == "inference":
        with torch.inference_mode():
            return block(x).clone()
    if mode == "no_grad":
        with torch.no_grad():
            return block(x)
    y = block(x)  # grad mode: BN weight/bias require grad, so the cached fold carries a gradient path
    assert y.requires_grad
    y.sum().backward()  # the backward through the cached fold must work from any thread too
    return y.detach()


def _close(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fold_cache_many_threads_mixed_grad_modes():
    """8 threads x mixed inference_mode / no_grad / grad mode on ONE model: the modes thrash the
    cache (an inference-mode fold must never reach a call that records gradients), and every
    result equals torchvision's."""
    tv, fused = _block_pair(0)
    x = rand(2, 8, 9, 9)
    with torch.no_grad():
        want = tv(x)
    modes = ["inference", "no_grad", "grad"]

    def work(i):
        outs = []
        for j in range(12):
            outs.append(_run(fused, x, modes[(i + j) % 3]))
        return outs

    with ThreadPoolExecutor(THREADS) as pool:
        results = [y for ys in pool.map(work, range(THREADS)) for y in ys]
    assert len(results) == THREADS * 12
    for y in results:
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


def test_fold_cache_sees_every_finished_update_from_another_thread():
    """One writer thread flips every BN of the model between two states, in place; 7 reader
    threads run eval forwards meanwhile. A call that no update overlapped must equal the
    reference of the state then current (never a stale fold); an overlapping one must not raise."""
    tv, fused = _block_pair(1)
    x = rand(2, 8, 9, 9)
    states = [_bn_state(tv)]
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m, torch.Generator().manual_seed(100 + m.num_features))
    states.append(_bn_state(tv))
    wants = []
    for s in states:
        _load_bn_state(tv, s)
        with torch.no_grad():
            wants.append(tv(x))
    assert not _close(wants[0], wants[1])  # the two states are distinguishable
    _load_bn_state(tv, states[0])
    # (generation, writing): replaced as one object, so a reader sees a consistent pair
    progress = {"now": (0, False)}
    done = [0]  # reader calls finished (a lone int in a list: += under the GIL is not atomic, but
    # the writer only needs it to move, not to be exact)
    stop = threading.Event()
    flips = 40

    def writer():
        try:
            for gen in range(1, flips + 1):
                progress["now"] = (gen - 1, True)
                _load_bn_state(tv, states[gen % 2])
                progress["now"] = (gen, False)
                start, t0 = done[0], time.monotonic()
                while done[0] < start + 4 and time.monotonic() - t0 < 2.0:  # let readers see this state
                    time.sleep(0.0005)
        finally:
            stop.set()

    def reader(i):
        clean, overlapped = [], 0
        modes = ["inference", "no_grad", "grad"]
        j = 0
        while not stop.is_set() or j < 3:
            before = progress["now"]
            y = _run(fused, x, modes[(i + j) % 3])
            after = progress["now"]
            done[0] += 1
            j += 1
            if before == after and not before[1]:
                clean.append((before[0], y))
            else:
                overlapped += 1
                assert torch.isfinite(y).all()
        return clean, overlapped

    with ThreadPoolExecutor(THREADS) as pool:
        w = pool.submit(writer)
        readers = [pool.submit(reader, i) for i in range(THREADS - 1)]
        w.result()
        results = [r.result() for r in readers]
    clean = [c for cs, _ in results for c in cs]
    seen = {gen % 2 for gen, _ in clean}
    assert len(clean) >= THREADS and seen == {0, 1}, (len(clean), seen)  # the test did exercise both states
    for gen, y in clean:
        assert _close(y, wants[gen % 2]), f"a call after update {gen} finished saw other parameters"
    # and after the writer is done, the model answers for the final state
    with torch.no_grad():
        torch.testing.assert_close(fused(x), wants[flips % 2], rtol=1e-4, atol=1e-4)


@requires_c
def test_onednn_weight_cache_many_threads_many_weights():
    """8 threads call conv_bn_act(backend="cpu") on 4 weights (different shapes, strides, groups)
    and 2 batch sizes each, interleaved, so entries are packed, hit and replaced concurrently; every
    result equals the float64 reference of its own weight."""
    gen = torch.Generator().manual_seed(0)
    configs = [  # (c, k, r, stride, padding, groups)
        (16, 32, 3, 1, 1, 1), (16, 32, 1, 2, 0, 1), (32, 32, 3, 2, 1, 4), (24, 40, 3, 1, 2, 2),
    ]
    cases = []
    for c, k, r, stride, padding, groups in configs:
        w = torch.randn(k, c // groups, r, r, generator=gen) * (2.0 / (c // groups * r * r)) ** 0.5
        scale, shift = torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen)
        for n in (1, 3):
            x = torch.randn(n, c, 10, 10, generator=gen).contiguous(memory_format=CL)
            kw = dict(stride=(stride, stride), padding=(padding, padding), groups=groups)
            want = ref.conv_bn_act(f64(x), f64(w), f64(scale), f64(shift), relu=True, **kw)
            cases.append((x, w, scale, shift, kw, want))

    def work(i):
        out = []
        for j in range(24):
            idx = (i * 5 + j * 3) % len(cases)
            x, w, scale, shift, kw, _ = cases[idx]
            out.append((idx, FF.conv_bn_act(x, w, scale, shift, relu=True, backend="cpu", **kw)))
        return out

    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for rs in pool.map(work, range(THREADS)) for r in rs]
    assert {idx for idx, _ in results} == set(range(len(cases)))
    for idx, y in results:
        assert_matches(y, cases[idx][5], torch.float32, what=f"case {idx}")


@requires_c
def test_onednn_weight_cache_sees_a_weight_update_between_calls():
    """The packed weight is keyed on the weight's version: an in-place update made by one thread
    is used by calls other threads start afterwards."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, 3, 3, generator=gen) * 0.2
    scale, shift = torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen)
    x = torch.randn(2, 8, 7, 7, generator=gen).contiguous(memory_format=CL)
    for step in range(3):
        want = ref.conv_bn_act(f64(x), f64(w), f64(scale), f64(shift), padding=(1, 1), relu=False)
        with ThreadPoolExecutor(THREADS) as pool:
            ys = list(pool.map(lambda _: FF.conv_bn_act(x, w, scale, shift, padding=1, relu=False, backend="cpu"),
                               range(THREADS * 2)))
        for y in ys:
            assert_matches(y, want, torch.float32, what=f"step {step}")
        with torch.no_grad():
            w.mul_(-0.5).add_(0.1)  # in place: the version counter moves


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_fused_resnet_model_many_threads(mode):
    """A whole fused torchvision resnet18 (stem folded, blocks adopted) in eval, 8 threads."""
    import torchvision

    from fused_resnet import fuse

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    fused = fuse(tv, backend=BACKEND).model.eval()
    x = rand(1, 3, 32, 32)
    with torch.no_grad():
        want = tv(x)

    with ThreadPoolExecutor(THREADS) as pool:
        ys = list(pool.map(lambda _: _run(fused, x, mode), range(THREADS * 2)))
    for y in ys:
        torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)


def test_fold_cache_never_mixes_threads_entries():
    """The cache itself, hammered with a tiny GIL switch interval so threads interleave between any
    two bytecodes: a caller outside inference mode must never receive an inference-mode fold made
    by another thread (it could not be used with autograd), nor a value without its gradient path.
    (Failed before the cache published key and value as one tuple.)"""
    import sys

    from fused_resnet.nn._fusion import FoldCache

    bn = nn.BatchNorm2d(8).eval()
    _randomize_bn(bn, torch.Generator().manual_seed(3))
    want = ref.fold_bn(bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach(), bn.eps)
    cache = FoldCache()
    bad = []

    def work(i):
        for j in range(800):
            if (i + j) % 2:
                with torch.inference_mode():
                    scale, shift = cache.get(bn, None, torch.float32)
            else:
                scale, shift = cache.get(bn, None, torch.float32)
                if scale.is_inference() or shift.is_inference() or scale.grad_fn is None:
                    bad.append((i, j))
            if not (torch.equal(scale, want[0]) and torch.equal(shift, want[1])):
                bad.append((i, j, "value"))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(work, range(THREADS)))
    finally:
        sys.setswitchinterval(old)
    assert not bad, f"{len(bad)} calls got another mode's or thread's fold, e.g. {bad[:3]}"
