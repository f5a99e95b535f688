"""Fused models in the PyTorch ecosystem: torch.compile(fullgraph=True), torch.export, autocast,
and no growth in memory or caches over many iterations."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torchvision
from conftest import requires_c

from fused_resnet import models

BACKENDS = ["torch", pytest.param("cpu", marks=requires_c)]


def _pair(backend, mode):
    """A small fused ResNet-18 and torchvision's with the same weights, in ``mode``."""
    torch.manual_seed(0)
    fused = models.resnet18(num_classes=10, backend=backend)
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(fused.state_dict(), strict=True)
    for m in (fused, tv):
        m.train(mode == "train")
    return fused, tv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_fullgraph_of_a_fused_model(backend, mode):
    fused, tv = _pair(backend, mode)
    x = torch.randn(2, 3, 32, 32)
    exact = copy.deepcopy(tv).double()
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with torch.set_grad_enabled(mode == "train"):
        y = compiled(x)
        e = tv(x)
        d = exact(x.double()).detach()
    # float32 against a float64 copy: within 2x torchvision's own float32 error (+ a small floor).
    # (Training BN over 2 values per channel in layer4 makes float32 itself only ~1e-3 accurate.)
    own = (e.detach().double() - d).abs().max()
    assert (y.detach().double() - d).abs().max() <= 2 * own + 1e-5 * d.abs().max()
    if mode == "train":
        y.sum().backward()
        assert fused.conv1.weight.grad is not None and fused.layer4[1].bn2.weight.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_of_a_fused_model_in_eval(backend):
    fused, tv = _pair(backend, "eval")
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(fused, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    if backend == "cpu":
        assert any("fused_resnet.conv_bn_act" in o for o in ops), sorted(ops)
    x2 = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ep.module()(x2), tv(x2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_autocast_gives_torchvisions_dtypes_and_accuracy(backend, mode):
    fused, tv = _pair(backend, mode)
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        exact = tv(x)  # float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, e = fused(x), tv(x)
            feats = fused.layer1(fused.maxpool(fused.relu(fused.bn1(fused.conv1(x)))))
            tv_feats = tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))
    assert y.dtype == e.dtype == torch.bfloat16 and feats.dtype == tv_feats.dtype
    # the design's low-precision rule: within 2x of torchvision's own bf16 error (+ a small floor)
    own = (e.float() - exact).abs().max()
    assert (y.float() - exact).abs().max() <= 2 * own + 1e-3 * exact.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_growth_over_many_iterations(backend):
    """Training and eval iterations leave no extra live tensors behind (fold caches are bounded)."""
    fused, _ = _pair(backend, "train")
    fused = fused.layer1  # two blocks are enough and quick
    opt = torch.optim.SGD(fused.parameters(), lr=0.01)
    x = torch.randn(2, 64, 8, 8)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # probing every object trips deprecation warnings
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    def step(i):
        fused.train(i % 2 == 0)
        with torch.set_grad_enabled(fused.training):
            y = fused(x)
        if fused.training:
            opt.zero_grad()
            y.sum().backward()
            opt.step()

    for i in range(4):
        step(i)
    before = live_tensors()
    for i in range(24):
        step(i)
    assert live_tensors() <= before + 2
