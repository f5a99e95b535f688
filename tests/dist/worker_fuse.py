"""One rank of the two-process fuse() + SyncBatchNorm test (see tests/test_distributed.py).

Usage: python worker_fuse.py RANK WORLD INIT_FILE INPUTS.pt OUT.pt BACKEND
A torchvision resnet18 is fused by ``fused_resnet.fuse`` and then converted by
``fused_resnet.nn.convert_sync_batchnorm`` (the folded stem BN included); one training step on
this rank's slice of the batch, parameter gradients averaged over ranks as
DistributedDataParallel does (gloo); saves output, input gradient, averaged gradients and buffers.
"""


import torch
import torch.distributed as dist
from _common import fused_resnet18, start
from torch import nn

import fused_resnet.nn as fnn
from fused_resnet import backends
from fused_resnet.convert import FoldedSyncBatchNorm


def main():
    rank, world, d, out, backend = start()
    model = fused_resnet18(d, backend)
    fnn.convert_sync_batchnorm(model)
    assert type(model.bn1) is FoldedSyncBatchNorm and isinstance(model.layer4[0].downsample[1], nn.SyncBatchNorm)
    model.train()
    lo, hi = d["splits"][rank], d["splits"][rank + 1]
    x = d["x"][lo:hi].clone().requires_grad_()
    with backends.trace() as log:
        y = model(x)
    (y * d["g"][lo:hi]).sum().backward()
    for p in model.parameters():  # what DDP does (it refuses SyncBatchNorm in CPU modules): average the gradients
        dist.all_reduce(p.grad)
        p.grad /= world
    torch.save({"y": y.detach(), "gx": x.grad, "ops": [f"{dcn.op}:{dcn.backend}" for dcn in log],
                "grads": {k: p.grad for k, p in model.named_parameters()},
                "buffers": {k: b.clone() for k, b in model.named_buffers()}}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
