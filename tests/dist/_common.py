"""What every two-rank worker in tests/dist does first (they run as scripts, so this folder is on
sys.path): read the command line, join the gloo group, load the inputs the test saved."""

import sys

import torch
import torch.distributed as dist


def start():
    """(rank, world, inputs dict, output path, backend) from
    ``worker.py RANK WORLD INIT_FILE INPUTS.pt OUT.pt BACKEND``, with the gloo group joined."""
    rank, world, init_file, inputs, out, backend = sys.argv[1:7]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    return rank, world, torch.load(inputs), out, backend


def fused_resnet18(d, backend):
    """torchvision resnet18 (float64) with the test's weights, fuse()d; every block must fuse."""
    import torchvision

    from fused_resnet import fuse

    model = torchvision.models.resnet18(num_classes=d["classes"]).double()
    model.load_state_dict(d["state"], strict=True)
    model, report = fuse(model, backend=backend)
    assert report.counts["skipped"] == 0, str(report)
    return model
