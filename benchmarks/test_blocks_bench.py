"""pytest-benchmark suite for whole residual blocks: the fused ``fused_resnet.nn`` Bottleneck and
BasicBlock against torchvision's, eval (inference) and train (forward + backward).

Run: ``pytest benchmarks/test_blocks_bench.py --benchmark-only``. Each benchmark first checks
the fused block's output against torchvision's block (same weights).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES, Rotating, dtype_for, synced
from torchvision.models.resnet import BasicBlock, Bottleneck

from fused_resnet.bench._util import randomize_bn, rel_err
from fused_resnet.bench.fusing import fused_block

BLOCKS = {
    "bottleneck_l2_proj": (lambda: Bottleneck(256, 128, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(256, 512, 1, stride=2, bias=False), torch.nn.BatchNorm2d(512))), 256, 56),
    "bottleneck_l3_identity": (lambda: Bottleneck(1024, 256), 1024, 14),
    "basic_l1_identity": (lambda: BasicBlock(64, 64), 64, 56),
}


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("variant", ["fused", "torchvision"])
@pytest.mark.parametrize("device", DEVICES)
def test_block(benchmark, device, variant, mode, name):
    make, c, hw = BLOCKS[name]
    dt = dtype_for(device)
    batch = 32 if device == "cuda" else 2
    g = torch.Generator().manual_seed(0)
    tv = randomize_bn(make(), g).train(mode == "train")
    if variant == "fused":
        try:
            blk = fused_block(tv, "cuda" if device == "cuda" else "cpu")[0]
        except Exception as exc:  # fused_resnet.nn missing or refusing the block
            pytest.skip(f"no fused block: {exc}")
    else:
        blk = copy.deepcopy(tv)
    blk = blk.to(device=device, dtype=dt, memory_format=torch.channels_last)
    xs = [torch.randn(batch, c, hw, hw, generator=g).to(device, dt).contiguous(memory_format=torch.channels_last)
          for _ in range(3)]
    ref = copy.deepcopy(tv).to(device=device, dtype=torch.float64)(xs[0].double())
    params = list(blk.parameters())

    def run(x):
        if mode == "eval":
            with torch.no_grad():
                return blk(x)
        x = x.detach().requires_grad_(True)
        y = blk(x)
        return torch.autograd.grad(y.float().sum(), [x] + params)

    if mode == "eval":
        assert rel_err(run(xs[0]), ref) < (3e-2 if dt == torch.bfloat16 else 1e-4)
    benchmark(synced(Rotating(xs, run), device))
