"""Synchronized batch statistics over two processes (gloo, CPU) equal the statistics of the whole
batch computed in one process: outputs, every gradient and the running statistics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_c

import fused_resnet
from fused_resnet import reference as ref
from fused_resnet.distributed import is_active, sync_stats

WORKER = Path(__file__).parent / "dist" / "worker_stats.py"
BLOCK_WORKER = Path(__file__).parent / "dist" / "worker_block.py"
FUSE_WORKER = Path(__file__).parent / "dist" / "worker_fuse.py"


def _run_two_ranks(worker: Path, inputs: dict, tmp_path: Path, backend: str) -> list[dict]:
    """Run ``worker`` as ranks 0 and 1 (gloo, file rendezvous) on ``inputs``; their saved outputs."""
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {key: v for key, v in os.environ.items() if not key.startswith("FUSED_RESNET_BACKEND")}
    env["FUSED_RESNET_QUIET"] = "1"
    root = str(Path(fused_resnet.__file__).resolve().parents[1])  # the tree under test, installed or not
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(r), "2", str(tmp_path / "init"),
                          str(tmp_path / "inputs.pt"), str(tmp_path / f"out{r}.pt"), backend],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    return [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]


def _check_ranks_match_whole_batch(outs, ref, y, x, splits, backend, close, conv_stats_calls=None):
    """Each rank's saved output, input gradient, gradients (averaged over the 2 ranks) and buffers
    equal the whole batch's through ``ref`` in one process (``y`` and ``x.grad``), and every op ran
    on ``backend`` with conv_stats among them (exactly ``conv_stats_calls`` times when given)."""
    for r, o in enumerate(outs):
        lo, hi = splits[r], splits[r + 1]
        n_stats = sum(op.startswith("conv_stats:") for op in o["ops"])
        assert n_stats > 0 and conv_stats_calls in (None, n_stats), o["ops"]
        assert all(op.endswith(":" + backend) for op in o["ops"]), o["ops"]
        torch.testing.assert_close(o["y"], y[lo:hi].detach(), **close)
        torch.testing.assert_close(o["gx"], x.grad[lo:hi], **close)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(o["grads"][name] * 2, p.grad, **close, msg=f"grad {name}")
        for name, b in ref.named_buffers():
            torch.testing.assert_close(o["buffers"][name], b, **close, msg=f"buffer {name}")


def test_sync_stats_passes_through_without_a_process_group():
    stats = torch.randn(2, 5)
    out, count = sync_stats(stats, 7)
    assert not is_active() and out is stats and count == 7


@pytest.mark.parametrize("bad,match", [(torch.randn(3, 5), "stats"), (torch.randn(5), "stats")])
def test_sync_stats_rejects_bad_stats(bad, match):
    with pytest.raises(ValueError, match=match):
        sync_stats(bad, 4)


def test_sync_stats_rejects_bad_count():
    with pytest.raises(ValueError, match="count"):
        sync_stats(torch.randn(2, 5), -1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=requires_c)])
def test_two_ranks_match_the_whole_batch(tmp_path, backend):
    torch.manual_seed(0)
    n, c, k, h = 5, 3, 4, 6
    splits = [0, 3, 5]  # unequal per-rank batches: 3 and 2 images
    dt = torch.float64
    d = {
        "x": torch.randn(n, c, h, h, dtype=dt) + 2.0, "w": torch.randn(k, c, 3, 3, dtype=dt),
        "gamma": torch.rand(k, dtype=dt) + 0.5, "beta": torch.randn(k, dtype=dt),
        "rm": torch.randn(k, dtype=dt), "rv": torch.rand(k, dtype=dt) + 0.5,
        "res": torch.randn(n, k, h, h, dtype=dt), "g": torch.randn(n, k, h, h, dtype=dt), "splits": splits,
    }
    outs = _run_two_ranks(WORKER, d, tmp_path, backend)

    # the whole batch in one process, with the reference
    x = d["x"].clone().requires_grad_()
    w, gamma, beta = (d[key].clone().requires_grad_() for key in ("w", "gamma", "beta"))
    z, stats = ref.conv_stats(x, w, padding=(1, 1))
    count = n * h * h
    scale, shift, _, _ = ref.bn_finalize(stats, count, gamma, beta, 1e-5)
    y = ref.bn_add_act(z, scale, shift, d["res"], relu=True)
    (y * d["g"]).sum().backward()
    rm, rv, nbt = d["rm"].clone(), d["rv"].clone(), torch.zeros((), dtype=torch.int64)
    ref.bn_update_running_stats(stats.detach(), count, rm, rv, nbt, 0.1)

    close = dict(rtol=1e-9, atol=1e-9)
    for r, o in enumerate(outs):
        lo, hi = splits[r], splits[r + 1]
        assert o["total"] == count
        torch.testing.assert_close(o["y"], y[lo:hi].detach(), **close)
        torch.testing.assert_close(o["gx"], x.grad[lo:hi], **close)
        torch.testing.assert_close(o["gw"], w.grad, **close)
        torch.testing.assert_close(o["ggamma"], gamma.grad, **close)
        torch.testing.assert_close(o["gbeta"], beta.grad, **close)
        torch.testing.assert_close(o["rm"], rm, **close)
        torch.testing.assert_close(o["rv"], rv, **close)
        assert int(o["nbt"]) == 1
        assert o["group_released"], "the autograd graph of sync_stats kept the process group alive"


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=requires_c)])
def test_data_parallel_fused_block_with_sync_batchnorm_matches_the_whole_batch(tmp_path, backend):
    """Two ranks, convert_sync_batchnorm + DDP-style gradient averaging: each rank's output and input gradient equal the
    whole batch's in one process (torchvision's block, float64); DDP's averaged parameter
    gradients times the world size equal the whole batch's; running statistics agree."""
    import torchvision.models.resnet as tvr
    from torch import nn

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
    ref_block = tvr.BasicBlock(4, 6, stride=2, downsample=down).double().train()
    for m in ref_block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    n, splits = 5, [0, 3, 5]
    d = {"state": {k: v.clone() for k, v in ref_block.state_dict().items()},
         "x": torch.randn(n, 4, 8, 8, dtype=torch.float64) + 1.0,
         "g": torch.randn(n, 6, 4, 4, dtype=torch.float64), "splits": splits}
    outs = _run_two_ranks(BLOCK_WORKER, d, tmp_path, backend)

    x = d["x"].clone().requires_grad_()
    y = ref_block(x)
    (y * d["g"]).sum().backward()
    # the fused path ran: batch statistics through conv_stats / bn_finalize, no unfused BN
    _check_ranks_match_whole_batch(outs, ref_block, y, x, splits, backend, dict(rtol=1e-9, atol=1e-9))


def test_convert_sync_batchnorm_adopts_parameters_also_after_fuse():
    import torchvision
    from torch import nn

    import fused_resnet.nn as fnn
    from fused_resnet import models
    from fused_resnet.convert import FoldedSyncBatchNorm, fuse

    m = models.resnet18(num_classes=3)
    before = {id(p) for p in m.parameters()}
    m.layer1.eval()
    fnn.convert_sync_batchnorm(m)
    assert isinstance(m.bn1, nn.SyncBatchNorm) and isinstance(m.layer4[1].bn2, nn.SyncBatchNorm)
    assert {id(p) for p in m.parameters()} == before
    assert not m.layer1[0].bn1.training and m.layer2[0].bn1.training
    fused, _ = fuse(torchvision.models.resnet18())
    fnn.convert_sync_batchnorm(fused)  # the folded stem BN converts too (it used to be refused)
    assert type(fused.bn1) is FoldedSyncBatchNorm
    with pytest.raises(TypeError, match="module"):
        fnn.convert_sync_batchnorm("resnet")


def test_two_ranks_fused_torchvision_resnet18_with_sync_batchnorm(tmp_path):
    """fuse(torchvision resnet18) + convert_sync_batchnorm on two ranks (3 and 1 images, float64):
    outputs, input gradients, DDP-averaged parameter gradients and running statistics equal
    nn.SyncBatchNorm's resnet18 on the whole batch in one process (where it is a plain BN)."""
    import torchvision
    from torch import nn

    from fused_resnet import _ext

    backend = "cpu" if _ext.available() else "torch"
    torch.manual_seed(0)
    ref_model = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=4)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in ref_model.modules():
            if isinstance(m, nn.SyncBatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    n, splits = 4, [0, 3, 4]  # rank 1 holds one image: 1 value per channel in the last stage on its own
    d = {"state": {k: v.clone() for k, v in ref_model.state_dict().items()}, "classes": 4,
         "x": torch.randn(n, 3, 16, 16, dtype=torch.float64, generator=g),
         "g": torch.randn(n, 4, dtype=torch.float64, generator=g), "splits": splits}
    outs = _run_two_ranks(FUSE_WORKER, d, tmp_path, backend)

    ref_model.train()
    x = d["x"].clone().requires_grad_()
    y = ref_model(x)
    (y * d["g"]).sum().backward()
    _check_ranks_match_whole_batch(outs, ref_model, y, x, splits, backend, dict(rtol=1e-7, atol=1e-9),
                                   conv_stats_calls=1 + 8 * 2 + 3)  # stem, blocks


DDP_WORKER = Path(__file__).parent / "dist" / "worker_ddp.py"


def test_two_ranks_ddp_wraps_a_fused_model(tmp_path):
    """The real DistributedDataParallel (gloo, CPU) around a fuse()d torchvision resnet18 with plain
    BatchNorm2d, two ranks of 2 images (float64): each rank's output equals eager torchvision on its
    slice, the gradients are the average of the two slices' eager gradients, and after one SGD step
    both ranks hold the same parameters as eager SGD with those averaged gradients."""
    import torchvision

    from fused_resnet import _ext

    backend = "cpu" if _ext.available() else "torch"
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=4).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in eager.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.2)
    splits = [0, 2, 4]
    d = {"state": {k: v.clone() for k, v in eager.state_dict().items()}, "classes": 4,
         "x": torch.randn(4, 3, 64, 64, dtype=torch.float64, generator=g),  # layer4: 2x2 per image
         "g": torch.randn(4, 4, dtype=torch.float64, generator=g), "splits": splits}
    outs = _run_two_ranks(DDP_WORKER, d, tmp_path, backend)

    eager.train()
    ys, grads = [], []
    for r in range(2):  # each rank's slice through its own copy (per-rank BN statistics, as DDP has)
        m = torchvision.models.resnet18(num_classes=4).double().train()
        m.load_state_dict(d["state"])
        lo, hi = splits[r], splits[r + 1]
        y = m(d["x"][lo:hi])
        (y * d["g"][lo:hi]).sum().backward()
        ys.append(y.detach())
        grads.append({k: p.grad for k, p in m.named_parameters()})
    close = dict(rtol=1e-7, atol=1e-9)
    params = dict(eager.named_parameters())
    for r, o in enumerate(outs):
        assert sum(op.startswith("conv_stats:") for op in o["ops"]) == 1 + 8 * 2 + 3, o["ops"]
        assert all(op.endswith(":" + backend) for op in o["ops"]), o["ops"]
        torch.testing.assert_close(o["y"], ys[r], **close)
        for name, p in params.items():
            avg = (grads[0][name] + grads[1][name]) / 2
            scale = dict(rtol=1e-7, atol=1e-9 * max(avg.abs().max().item(), 1.0))  # relative to the tensor
            torch.testing.assert_close(o["grads"][name], avg, **scale, msg=f"grad {name}")
            torch.testing.assert_close(o["params"][name], p.detach() - 0.1 * avg, **scale, msg=f"param {name}")
