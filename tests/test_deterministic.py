"""Deterministic mode: ``torch.use_deterministic_algorithms(True)`` with the CPU backends.

What the kernels promise (csrc/cpu/cpu_kernels.h, fused_resnet/triton/conv.py, csrc/cuda/kernels.cu):
every reduction (conv_stats' statistics, the BN backward sums) splits its rows into fixed chunks
independent of the thread count and merges the chunk partials in a fixed order -- no atomics.
So the flag changes nothing in our kernels: they are always deterministic; under the flag the
convolutions they call (ATen/oneDNN on CPU, cuDNN's backward on GPU) are made deterministic by
PyTorch itself. Checked here:

* under the flag, every op on the ``torch`` and ``cpu`` backends, forward and backward, in every
  dtype, runs without error and is bitwise reproducible between two runs; so are a fused
  Bottleneck's training step (output, every gradient, running statistics) and its eval forward;
* our reductions give bitwise the same statistics and BN-backward sums with 1 and 2 threads
  (inputs chosen so the convolution itself is exact, to isolate the reduction). Not promised
  across thread counts: the convolution outputs and conv gradients, which are ATen/oneDNN's and
  may block their sums by thread count.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CL, requires_c
from torch import nn

import fused_resnet.nn as fnn
from fused_resnet import functional as FF
from fused_resnet import reference as ref

BACKENDS = ["torch", pytest.param("cpu", marks=requires_c)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)  # errors (not warnings) for a nondeterministic op
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _rand(*shape, dtype, gen, scale=1.0, offset=0.0):
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale + offset).to(dtype)


def _inputs(dtype, seed=0):
    """A ResNet-like conv (stride 2, projection-sized) and an odd one (groups, dilation, 5 channels)."""
    gen = torch.Generator().manual_seed(seed)
    acc = ref.acc_dtype(dtype)
    d = {}
    d["x"] = _rand(2, 16, 15, 15, dtype=dtype, gen=gen).contiguous(memory_format=CL)
    d["w"] = _rand(24, 8, 3, 3, dtype=dtype, gen=gen, scale=0.2)  # groups=2
    d["scale"] = _rand(24, dtype=acc, gen=gen).abs() + 0.5
    d["shift"] = _rand(24, dtype=acc, gen=gen)
    d["in_scale"] = _rand(16, dtype=acc, gen=gen).abs() + 0.5
    d["in_shift"] = _rand(16, dtype=acc, gen=gen)
    d["res"] = _rand(2, 24, 8, 8, dtype=dtype, gen=gen).contiguous(memory_format=CL)
    d["g"] = _rand(2, 24, 8, 8, dtype=dtype, gen=gen)
    d["gamma"] = _rand(24, dtype=acc, gen=gen).abs() + 0.5
    d["beta"] = _rand(24, dtype=acc, gen=gen)
    return d


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _all_ops(backend: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every op forward and backward on fresh leaves; returns outputs, gradients and buffers."""
    d = _inputs(dtype)
    conv = dict(stride=2, padding=2, dilation=2, groups=2)
    out = []

    x, w, scale, shift, res = (_leaf(d[k]) for k in ("x", "w", "scale", "shift", "res"))
    y = FF.conv_bn_act(x, w, scale, shift, res, relu=True, backend=backend, **conv)
    gs = torch.autograd.grad(y, (x, w, scale, shift, res), d["g"])
    out += [y, *gs]

    x, w, in_scale, in_shift = (_leaf(d[k]) for k in ("x", "w", "in_scale", "in_shift"))
    gamma, beta = _leaf(d["gamma"]), _leaf(d["beta"])
    z, stats = FF.conv_stats(x, w, in_scale, in_shift, True, backend=backend, **conv)
    rm, rv = torch.zeros(24, dtype=stats.dtype), torch.ones(24, dtype=stats.dtype)
    nbt = torch.zeros((), dtype=torch.int64)
    count = z.numel() // z.shape[1]
    sc, sh, mean, invstd = FF.bn_finalize(stats, count, gamma, beta, rm, rv, nbt, 0.1, 1e-5, backend=backend)
    res = _leaf(d["res"])
    res_scale, res_shift = _leaf(d["scale"]), _leaf(d["shift"])
    y = FF.bn_add_act(z, sc, sh, res, res_scale, res_shift, relu=True, backend=backend)
    gs = torch.autograd.grad(y, (x, w, in_scale, in_shift, gamma, beta, res, res_scale, res_shift), d["g"])
    out += [z, stats, sc, sh, mean, invstd, rm, rv, nbt, y, *gs]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_runs_and_is_bitwise_reproducible(deterministic, backend, dtype):
    first = _all_ops(backend, dtype)
    second = _all_ops(backend, dtype)
    assert len(first) == len(second) == 25  # 6 from conv_bn_act, 19 from the training chain
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert a is not None and torch.isfinite(a.double()).all(), i
        assert torch.equal(a, b), f"result {i} differs between two runs"


def _bottleneck(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    down = nn.Sequential(nn.Conv2d(16, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    block = fnn.Bottleneck(16, 16, stride=2, downsample=down, backend="cpu")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return block


def _train_step(block: nn.Module, x: torch.Tensor, g: torch.Tensor):
    block = copy.deepcopy(block).train()
    x = x.clone().requires_grad_()
    y = block(x)
    (y * g).sum().backward()
    grads = [p.grad for p in block.parameters()]
    return [y.detach(), x.grad, *grads, *block.buffers()]


@requires_c
def test_fused_block_training_and_eval_bitwise_reproducible(deterministic):
    block = _bottleneck()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, 14, 14, generator=gen).contiguous(memory_format=CL)
    g = torch.randn(3, 64, 7, 7, generator=gen)
    first, second = _train_step(block, x, g), _train_step(block, x, g)
    assert len(first) == len(second) == 2 + 12 + 12  # y, x.grad, 4 convs + 4 BNs x 2, 4 BNs x 3 buffers
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a, b), f"training result {i} differs between two runs"
    block.eval()
    with torch.no_grad():
        assert torch.equal(block(x), block(x))


# ----------------------------------------------------------------------------- across thread counts


def _exact_conv_inputs(gen):
    """Integer-valued x and w, small enough that every conv sum is exact in float32 whatever the
    summation order: z is then bitwise the same for any thread count, and only our reduction of
    it can differ. 2*96*96 = 18432 rows = 72 chunks of 256, several parallel tasks."""
    x = torch.randint(-3, 4, (2, 8, 96, 96), generator=gen).float().contiguous(memory_format=CL)
    w = torch.randint(-2, 3, (8, 8, 1, 1), generator=gen).float()
    return x, w


@requires_c
def test_conv_stats_statistics_bitwise_across_thread_counts(threads):
    gen = torch.Generator().manual_seed(0)
    x, w = _exact_conv_inputs(gen)
    x = x + 0.25 * torch.randint(0, 2, x.shape, generator=gen).float()  # still exact: multiples of 1/4
    results = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        results[n] = FF.conv_stats(x, w, backend="cpu")
    (z1, s1), (z2, s2) = results[1], results[2]
    assert torch.equal(z1, z2)  # the premise: the convolution is exact
    assert torch.equal(s1, s2), "conv_stats statistics depend on the thread count"
    # and they are the right statistics
    _, want = ref.conv_stats(x.double(), w.double())
    torch.testing.assert_close(s1.double(), want, rtol=1e-5, atol=1e-4)


@requires_c
def test_bn_backward_sums_bitwise_across_thread_counts(threads):
    """The reductions of bn_add_act's backward (sum(g), sum(g*z), sum(g*residual)) and the
    statistics' backward, over 18432 rows, with 1 and 2 threads."""
    gen = torch.Generator().manual_seed(1)
    k = 8
    z = torch.randn(2, k, 96, 96, generator=gen).contiguous(memory_format=CL)
    res = torch.randn(2, k, 96, 96, generator=gen).contiguous(memory_format=CL)
    g = torch.randn(2, k, 96, 96, generator=gen)
    vecs = [torch.randn(k, generator=gen) for _ in range(4)]
    results = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        zl, rl = _leaf(z), _leaf(res)
        scale, shift, rs, rb = (_leaf(v) for v in vecs)
        y = FF.bn_add_act(zl, scale, shift, rl, rs, rb, relu=True, backend="cpu")
        results[n] = torch.autograd.grad(y, (zl, scale, shift, rl, rs, rb), g)
    for i, (a, b) in enumerate(zip(results[1], results[2], strict=True)):
        assert torch.equal(a, b), f"bn_add_act gradient {i} depends on the thread count"

    x, w = _exact_conv_inputs(gen)
    grads = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        xl = _leaf(x)
        zz, stats = FF.conv_stats(xl, w, backend="cpu")
        sc, sh, _, _ = FF.bn_finalize(stats, zz.numel() // zz.shape[1], backend="cpu")
        y = FF.bn_add_act(zz, sc, sh, relu=True, backend="cpu")
        grads[n] = torch.autograd.grad(y, (xl,), torch.ones_like(y))[0]
    # the input gradient goes through a conv backward (oneDNN), exact here too (1x1, integer weights)
    assert torch.equal(grads[1], grads[2]), "the statistics' backward depends on the thread count"
