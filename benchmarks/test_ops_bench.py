"""pytest-benchmark suite for the fused ops, one ResNet-50 layer shape each (batch 2 on CPU,
32 on CUDA): ``conv_bn_act`` per backend against eager conv + BN (its folded affine) + add + ReLU, and the training
chain ``conv_stats`` -> ``bn_finalize`` -> ``bn_add_act`` forward + backward.

Run: ``pytest benchmarks/test_ops_bench.py --benchmark-only`` (add ``--benchmark-json out.json``).
Every benchmark first checks its result against the reference, so a fast wrong kernel fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from conftest import DEVICES, Rotating, dtype_for, synced

from fused_resnet import backends, functional, reference

# (name, c, hw, k, r, stride, padding, residual)
SHAPES = [
    ("l1_3x3", 64, 56, 64, 3, 1, 1, False),
    ("l1_expand_res", 64, 56, 256, 1, 1, 0, True),
    ("l3_3x3_s2", 256, 28, 256, 3, 2, 1, False),
    ("l4_expand_res", 512, 7, 2048, 1, 1, 0, True),
]


def _data(device, shape, batch):
    _, c, hw, k, r, stride, padding, residual = shape
    dt = dtype_for(device)
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    xs = [torch.randn(batch, c, hw, hw, generator=g).to(device, dt).contiguous(memory_format=cl) for _ in range(3)]
    w = (torch.randn(k, c, r, r, generator=g) * (c * r * r) ** -0.5).to(device, dt).contiguous(memory_format=cl)
    p = (hw + 2 * padding - r) // stride + 1
    res = torch.randn(batch, k, p, p, generator=g).to(device, dt).contiguous(memory_format=cl) if residual else None
    scale = (torch.rand(k, generator=g) + 0.5).to(device)
    shift = (torch.randn(k, generator=g) * 0.1).to(device)
    return xs, w, res, scale, shift, dict(stride=stride, padding=padding)


def _batch(device):
    return 32 if device == "cuda" else 2


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("variant", ["fused", "eager"])
@pytest.mark.parametrize("device", DEVICES)
def test_conv_bn_act(benchmark, device, variant, shape):
    xs, w, res, scale, shift, conv = _data(device, shape, _batch(device))
    backend = "cuda" if device == "cuda" else "cpu"
    if variant == "fused" and backends.unsupported_reason(backend, torch.device(device), w.dtype, "conv_bn_act"):
        pytest.skip(backends.unsupported_reason(backend, torch.device(device), w.dtype, "conv_bn_act"))

    def fused(x):
        return functional.conv_bn_act(x, w, scale, shift, res, backend=backend, **conv)

    def eager(x):
        y = TF.conv2d(x, w, **conv) * scale.to(w.dtype).view(1, -1, 1, 1) + shift.to(w.dtype).view(1, -1, 1, 1)
        return torch.relu(y + res if res is not None else y)

    fn = fused if variant == "fused" else eager
    with torch.no_grad():
        ref = reference.conv_bn_act(xs[0].double(), w.double(), scale.double(), shift.double(),
                                    None if res is None else res.double(), [conv["stride"]] * 2,
                                    [conv["padding"]] * 2, [1, 1], 1, True)
        got = fn(xs[0]).double()
        tol = 3e-2 if w.dtype == torch.bfloat16 else 1e-4
        assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()
        benchmark(synced(Rotating(xs, fn), device))


@pytest.mark.parametrize("shape", SHAPES[:2], ids=[s[0] for s in SHAPES[:2]])
@pytest.mark.parametrize("device", DEVICES)
def test_training_chain(benchmark, device, shape):
    xs, w, res, _, _, conv = _data(device, shape, _batch(device))
    backend = "cuda" if device == "cuda" else "cpu"
    why = backends.unsupported_reason(backend, torch.device(device), w.dtype, "conv_stats")
    if why:
        pytest.skip(why)
    k = w.shape[0]
    gamma = torch.ones(k, device=device, requires_grad=True)
    beta = torch.zeros(k, device=device, requires_grad=True)
    w = w.detach().requires_grad_(True)

    def step(x):
        x = x.detach().requires_grad_(True)
        z, st = functional.conv_stats(x, w, backend=backend, **conv)
        sc, sh, _, _ = functional.bn_finalize(st, z.shape[0] * z.shape[2] * z.shape[3], gamma, beta, backend=backend)
        y = functional.bn_add_act(z, sc, sh, res, backend=backend)
        return torch.autograd.grad(y.float().sum(), (x, w, gamma, beta))

    grads = step(xs[0])
    assert all(torch.isfinite(g).all() for g in grads)
    benchmark(synced(Rotating(xs, step), device))
