"""One rank of the two-process DistributedDataParallel test (see tests/test_distributed.py).

Usage: python worker_ddp.py RANK WORLD INIT_FILE INPUTS.pt OUT.pt BACKEND
A torchvision resnet18 (plain BatchNorm2d) is fused by ``fused_resnet.fuse``, wrapped in the real
``torch.nn.parallel.DistributedDataParallel`` (gloo, CPU) and takes one SGD step on this rank's
slice of the batch; saves the output, the (DDP-averaged) gradients, the parameters after the step
and the fused ops that ran.
"""


import torch
import torch.distributed as dist
from _common import fused_resnet18, start
from torch.nn.parallel import DistributedDataParallel

from fused_resnet import backends


def main():
    rank, world, d, out, backend = start()
    model = fused_resnet18(d, backend)
    model.train()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    lo, hi = d["splits"][rank], d["splits"][rank + 1]
    with backends.trace() as log:
        y = ddp(d["x"][lo:hi])
    (y * d["g"][lo:hi]).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    torch.save({"y": y.detach(), "ops": [f"{dcn.op}:{dcn.backend}" for dcn in log], "grads": grads,
                "params": {k: p.detach().clone() for k, p in model.named_parameters()}}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
