"""One rank of the two-process fused-block DDP test (see tests/test_distributed.py).

Usage: python worker_block.py RANK WORLD INIT_FILE INPUTS.pt OUT.pt BACKEND
A fused BasicBlock with a projection shortcut, its BNs converted to SyncBatchNorm, with its
gradients averaged as DistributedDataParallel does (gloo), runs one training step on this rank's
slice of the batch and saves its output, input gradient, parameter gradients (as DDP averaged
them) and running statistics.
"""


import torch
import torch.distributed as dist
from _common import start
from torch import nn

import fused_resnet.nn as fnn
from fused_resnet import backends


def main():
    rank, world, d, out, backend = start()
    down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
    block = fnn.BasicBlock(4, 6, stride=2, downsample=down, backend=backend).double()
    block.load_state_dict(d["state"], strict=True)
    fnn.convert_sync_batchnorm(block)
    assert isinstance(block.bn1, nn.SyncBatchNorm) and isinstance(block.downsample[1], nn.SyncBatchNorm)
    # DistributedDataParallel refuses SyncBatchNorm in CPU modules ("SyncBatchNorm layers only work
    # with GPU modules"), so on CPU the gradient averaging DDP performs is done by hand below.
    model = block
    lo, hi = d["splits"][rank], d["splits"][rank + 1]
    x = d["x"][lo:hi].clone().requires_grad_()
    with backends.trace() as log:
        y = model(x)
    (y * d["g"][lo:hi]).sum().backward()
    for p in block.parameters():  # what DDP does: average the parameter gradients over ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    torch.save({"y": y.detach(), "gx": x.grad, "ops": [f"{dcn.op}:{dcn.backend}" for dcn in log],
                "grads": {k: p.grad for k, p in block.named_parameters()},
                "buffers": {k: b.clone() for k, b in block.named_buffers()}}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
