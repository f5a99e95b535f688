"""One rank of the two-process DistributedDataParallel test (see tests/test_distributed.py).

Usage: python worker_ddp.py RANK WORLD INIT_FILE INPUTS.pt OUT.pt BACKEND
A torchvision resnet18 (plain BatchNorm2d) is fused by ``fused_resnet.fuse``, wrapped in the real
``torch.nn.parallel.DistributedDataParallel`` (gloo, CPU) and takes one SGD step on this rank's
slice of the batch; saves the output, the (DDP-averaged) gradients, the parameters after the step
and the fused ops that ran.
"""

import sys

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel

from fused_resnet import backends, fuse


def main():
    rank, world, init_file, inputs, out, backend = sys.argv[1:7]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    d = torch.load(inputs)
    model = torchvision.models.resnet18(num_classes=d["classes"]).double()
    model.load_state_dict(d["state"], strict=True)
    model, report = fuse(model, backend=backend)
    assert report.counts["skipped"] == 0, str(report)
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
