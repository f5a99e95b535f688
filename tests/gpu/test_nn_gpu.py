"""Fused blocks and models on CUDA (backend ``cuda``) vs torchvision: the CPU suite's checks on a GPU.

float64 is held tight; float32 with TF32 off; float16 by the design's rule (error against the
float64 result at most 2x torchvision's own float16 error, plus a floor). Skips without CUDA or
without the CUDA kernels in ``fused_resnet._C``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import OpRecorder, close
from conftest import randomize_norms as shared_randomize_norms
from gpu_common import no_tf32_seeded  # noqa: F401  (autouse fixture: TF32 off, fixed seed)
from torch import nn
from torchvision.models import resnet as tv
from torchvision.ops import FrozenBatchNorm2d

try:
    from fused_resnet import _ext, models
    from fused_resnet import nn as fnn
except Exception:  # pragma: no cover - keeps the module collectable while the package changes
    _ext = None


def _has_cuda_kernels() -> bool:
    try:
        return _ext is not None and _ext.available() and _ext.has_kernel("conv_bn_act", "CUDA")
    except Exception:
        return False


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not _has_cuda_kernels(), reason="fused_resnet._C has no CUDA kernels"),
]

DEV = "cuda"
CL = torch.channels_last



randomize_norms = functools.partial(shared_randomize_norms, seed=7)



def block_pair(kind, dtype, norm_layer=None):
    if kind == "basic":
        args, tv_cls, f_cls, c = (64, 128, 2), tv.BasicBlock, fnn.BasicBlock, 128
    else:
        args, tv_cls, f_cls, c = (256, 128, 2), tv.Bottleneck, fnn.Bottleneck, 512
    norm = norm_layer or nn.BatchNorm2d

    def ds():
        return nn.Sequential(nn.Conv2d(args[0], c, 1, 2, bias=False), norm(c))

    ref = tv_cls(*args, ds(), norm_layer=norm_layer)
    randomize_norms(ref)
    ref = ref.to(DEV, dtype)
    fused = f_cls(*args, ds(), norm_layer=norm_layer, backend="cuda").to(DEV, dtype)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(4, args[0], 28, 28, device=DEV, dtype=dtype).contiguous(memory_format=CL)
    return ref, fused, x


def compare(ref, fused, x, rtol, steps=1):
    for _ in range(steps):
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = ref(xr), fused(xf)
        close(yf, yr, "output", rtol)
        g = torch.randn_like(yr)
        yr.backward(g)
        yf.backward(g)
        close(xf.grad, xr.grad, "grad x", rtol)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters(), strict=True):
        if p.grad is not None:
            close(q.grad, p.grad, f"grad {name}", rtol)
    for (name, b), c in zip(ref.named_buffers(), fused.buffers(), strict=True):
        close(c, b, f"buffer {name}", rtol)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_block_matches_torchvision(kind, dtype, rtol, mode):
    ref, fused, x = block_pair(kind, dtype)
    ref.train(mode == "train")
    fused.train(mode == "train")
    compare(ref, fused, x, rtol, steps=2)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_frozen_bn_block(kind):
    ref, fused, x = block_pair(kind, torch.float64, norm_layer=FrozenBatchNorm2d)
    compare(ref, fused, x, 1e-9)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_float16_eval_block(kind):
    ref, fused, x = block_pair(kind, torch.float32)
    ref.eval()
    fused.eval()
    truth = copy.deepcopy(ref).double()
    with torch.no_grad():
        expected = truth(x.double())
        own = (copy.deepcopy(ref).half()(x.half()).double() - expected).abs().max().item()
        got = (fused.half()(x.half()).double() - expected).abs().max().item()
    assert got <= 2 * own + 1e-3 * max(expected.abs().max().item(), 1.0), (got, own)


@pytest.mark.parametrize("kind,count", [("basic", 3), ("bottleneck", 4)])
def test_eval_block_is_one_op_per_unit(kind, count):
    _, fused, x = block_pair(kind, torch.float32)
    fused.eval()
    with torch.no_grad():
        fused(x)
        with OpRecorder() as rec:
            fused(x)
    assert rec.ops == ["fused_resnet.conv_bn_act"] * count


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resnet50_matches_torchvision(mode):
    ref = torchvision.models.resnet50()
    randomize_norms(ref)
    ref = ref.to(DEV)
    fused = models.resnet50(backend="cuda").to(DEV)
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.train(mode == "train")
    fused.train(mode == "train")
    x = torch.randn(4, 3, 224, 224, device=DEV)
    compare(ref, fused, x, 1e-3)


def test_resnet50_eval_ops():
    fused = models.resnet50(backend="cuda").to(DEV).eval()
    x = torch.randn(2, 3, 224, 224, device=DEV)
    with torch.no_grad():
        fused(x)
        with OpRecorder() as rec:
            fused(x)
    assert rec.ops.count("fused_resnet.conv_bn_act") == 53
    assert not {"aten.native_batch_norm", "aten.cudnn_batch_norm", "aten.relu", "aten.add",
                "aten.convolution"} & set(rec.ops)


def test_eval_plan_on_cuda(monkeypatch):
    """Eval plans (direct conv_bn_act calls after one validating forward) on CUDA: taken, equal to
    the ordinary path, and rebuilt after an in-place BN update."""
    ref = torchvision.models.resnet50()
    randomize_norms(ref)
    ref = ref.to(DEV).eval()
    fused = models.resnet50(backend="cuda").to(DEV).eval()
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96, device=DEV)
    with torch.no_grad():
        monkeypatch.setenv("FUSED_RESNET_FAST_EVAL", "0")
        ordinary = fused(x)
        monkeypatch.setenv("FUSED_RESNET_FAST_EVAL", "1")
        fused(x)
        planned = fused(x)
        assert fused.layer1[0]._plan_slot.plan is not None and fused._stem_plan.plan is not None
        assert fused._stem_plan.plan.stem is None  # the oneDNN stem is CPU-only
        close(planned, ordinary, "plan vs ordinary", 1e-6)
        close(planned, ref(x), "plan vs torchvision", 1e-3)
        for m in (ref, fused):
            m.layer2[1].bn2.running_mean.add_(0.5)
        close(fused(x), ref(x), "after an in-place BN update", 1e-3)


def test_cifar_resnet20_convergence():
    from fused_resnet.models import cifar_resnet20

    torch.manual_seed(0)
    fused = cifar_resnet20(backend="cuda").to(DEV)
    eager = copy.deepcopy(fused)
    eager.backend = "torch"  # the reference ops: plain PyTorch on the GPU
    x = torch.randn(32, 3, 32, 32, device=DEV)
    y = torch.randint(0, 10, (32,), device=DEV)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in (fused, eager)]
    first = None
    for step in range(30):
        pair = []
        for m, opt in zip((fused, eager), opts, strict=True):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            pair.append(loss.item())
        first = first or pair[1]
        assert abs(pair[0] - pair[1]) <= 1e-3 * max(1.0, pair[1]), (step, pair)
    assert pair[1] < 0.5 * first


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("amp", [False, True])
def test_block_tape_equals_op_by_op_on_cuda(kind, amp, monkeypatch):
    """Training blocks run as one autograd node (fused_resnet.nn._tape) on CUDA too: the same
    output, input/parameter gradients and running statistics as the op-by-op path
    (FUSED_RESNET_FAST_TRAIN=0), float32 and under bfloat16 autocast."""
    from fused_resnet.nn import _tape

    # bitwise comparison: cuDNN must pick the same (deterministic) algorithms on both paths
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    _, fused, x = block_pair(kind, torch.float32)
    fused.train()
    g = torch.randn(fused(x).shape, device=DEV)
    out = {}
    for fast in ("1", "0"):
        monkeypatch.setenv(_tape.FAST_TRAIN_ENV, fast)
        m = copy.deepcopy(fused)
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            y = m(xx)
        y.float().backward(g)
        out[fast] = (y.detach().float(), xx.grad, [p.grad for p in m.parameters()],
                     [b.clone() for b in m.buffers()], type(y.grad_fn).__name__)
    assert out["1"][4] == "BlockFunctionBackward" and out["0"][4] != "BlockFunctionBackward"
    torch.testing.assert_close(out["1"][0], out["0"][0], rtol=0, atol=0)
    torch.testing.assert_close(out["1"][1], out["0"][1], rtol=0, atol=0)
    for a, b in zip(out["1"][2] + out["1"][3], out["0"][2] + out["0"][3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recomputed_block_inputs_on_cuda(monkeypatch):
    """ResNet-50 training step under bfloat16 autocast on CUDA with recomputed block inputs and the
    taped stem (FUSED_RESNET_RECOMPUTE=1) vs saved ones (=0): bit for bit the same gradients, and
    the allocator's peak lower. The CPU count (benchmarks/held_memory.py, amp batch 16) gives
    0.66x vs 0.91x of eager; here the fused peak must drop by at least 15 % at batch 32."""
    from fused_resnet.models import resnet50
    from fused_resnet.nn import _tape

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    torch.manual_seed(0)
    base = resnet50(num_classes=100).to(DEV, memory_format=torch.channels_last).train()
    x = torch.randn(32, 3, 224, 224, device=DEV).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 100, (32,), device=DEV)
    out = {}
    for rc in ("0", "1"):
        monkeypatch.setenv(_tape.RECOMPUTE_ENV, rc)
        m = copy.deepcopy(base)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(x)
        F.cross_entropy(logits.float(), labels).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        out[rc] = (peak, [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()])
        del logits
    for a, b in zip(out["1"][1] + out["1"][2], out["0"][1] + out["0"][2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert out["1"][0] < 0.85 * out["0"][0], (out["1"][0] / 2**20, out["0"][0] / 2**20)
