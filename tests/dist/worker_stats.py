"""One rank of the two-process synchronized-statistics test (see tests/test_distributed.py).

Usage: python worker_stats.py RANK WORLD INIT_FILE INPUTS.pt OUT.pt BACKEND
Runs conv_stats -> sync_stats -> bn_finalize (running stats) -> bn_add_act on this rank's slice of
the batch with the gloo backend, all-reduces the parameter gradients as DDP would, and saves the
outputs, gradients and running statistics.
"""

import gc
import sys
import weakref

import torch
import torch.distributed as dist

from fused_resnet import functional as FF
from fused_resnet.distributed import sync_stats


def main():
    rank, world, init_file, inputs, out, backend = sys.argv[1:7]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    d = torch.load(inputs)
    lo, hi = d["splits"][rank], d["splits"][rank + 1]
    x = d["x"][lo:hi].clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    w = d["w"].clone().requires_grad_()
    gamma = d["gamma"].clone().requires_grad_()
    beta = d["beta"].clone().requires_grad_()
    rm, rv, nbt = d["rm"].clone(), d["rv"].clone(), torch.zeros((), dtype=torch.int64)
    res = d["res"][lo:hi].contiguous(memory_format=torch.channels_last)

    z, stats = FF.conv_stats(x, w, padding=1, backend=backend)
    count = z.shape[0] * z.shape[2] * z.shape[3]
    stats, total = sync_stats(stats, count)
    scale, shift, _, _ = FF.bn_finalize(stats, total, gamma, beta, rm, rv, nbt, momentum=0.1, eps=1e-5,
                                        backend=backend)
    y = FF.bn_add_act(z, scale, shift, res, relu=True, backend=backend)
    (y * d["g"][lo:hi]).sum().backward()
    for p in (w, gamma, beta):  # what DDP does with parameter gradients (sum; the loss is a sum)
        dist.all_reduce(p.grad)
    # The graph behind y is still alive here, as it is in a user's training loop: it must not keep
    # the process group alive past destroy_process_group(), or gloo is torn down during
    # interpreter exit and the process aborts now and then.
    group = weakref.ref(dist.distributed_c10d._get_default_group())
    dist.destroy_process_group()
    gc.collect()
    torch.save({"y": y.detach(), "gx": x.grad, "gw": w.grad, "ggamma": gamma.grad, "gbeta": beta.grad,
                "rm": rm, "rv": rv, "nbt": nbt, "total": total, "group_released": group() is None}, out)


if __name__ == "__main__":
    main()
