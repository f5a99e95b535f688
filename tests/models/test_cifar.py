"""He et al.'s CIFAR ResNets / plain nets: structure, parameter counts, and outputs vs an eager forward."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import OpRecorder, close, requires_c
from conftest import randomize_norms as shared_randomize_norms
from torch import nn

from fused_resnet import models
from fused_resnet import nn as fnn

BACKENDS = ["torch", pytest.param("cpu", marks=requires_c)]
# Table 6 of the paper: parameters of the CIFAR-10 ResNets (option A).
PAPER_PARAMS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}


def eager_forward(model: models.CifarResNet, x: torch.Tensor) -> torch.Tensor:
    """The same network written directly in eager PyTorch (nn.BatchNorm2d, F.relu, +), with option
    A's shortcut spelled out: stride-2 subsampling and zero channels appended."""
    out = F.relu(model.bn1(model.conv1(x)))
    for stage in (model.layer1, model.layer2, model.layer3):
        for blk in stage:
            y = F.relu(blk.bn1(blk.conv1(out)))
            y = blk.bn2(blk.conv2(y))
            if not model.plain:
                if blk.downsample is None:
                    shortcut = out
                elif isinstance(blk.downsample, nn.Sequential):
                    shortcut = blk.downsample[1](blk.downsample[0](out))
                else:
                    sub = out[:, :, ::2, ::2]
                    zeros = sub.new_zeros(sub.shape[0], y.shape[1] - sub.shape[1], *sub.shape[2:])
                    shortcut = torch.cat([sub, zeros], dim=1)
                y = y + shortcut
            out = F.relu(y)
    return model.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


randomize_norms = functools.partial(shared_randomize_norms, seed=5)



@pytest.mark.parametrize("depth", list(PAPER_PARAMS))
def test_depth_and_parameter_count_match_the_paper(depth):
    # built on the CPU: on the meta device every init call goes through Python decompositions (slower)
    m = getattr(models, f"cifar_resnet{depth}")()
    p = getattr(models, f"cifar_plain{depth}")()
    n = (depth - 2) // 6
    weighted = [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 6 * n + 2  # option A adds no weighted layer
    count = sum(t.numel() for t in m.parameters())
    digits = 1 if PAPER_PARAMS[depth] >= 1 else 2
    assert round(count / 1e6, digits) == PAPER_PARAMS[depth], count
    assert sum(t.numel() for t in p.parameters()) == count  # the plain net has the same weights
    assert [len(s) for s in (m.layer1, m.layer2, m.layer3)] == [n, n, n]
    assert m.fc.in_features == 64 and m.fc.out_features == 10


def test_shortcut_options_structure():
    a, b, c, p = (models.cifar_resnet20(shortcut="A"), models.cifar_resnet20(shortcut="B"),
                  models.cifar_resnet20(shortcut="c"), models.cifar_plain20())
    blocks = {k: [x for s in (m.layer1, m.layer2, m.layer3) for x in s] for k, m in zip("ABCP", (a, b, c, p),
                                                                                       strict=True)}
    entry = [False, False, False, True, False, False, True, False, False]  # shape changes at stage entries
    assert [isinstance(x.downsample, models.PadShortcut) for x in blocks["A"]] == entry
    assert [x.downsample is not None for x in blocks["A"]] == entry
    assert [isinstance(x.downsample, nn.Sequential) for x in blocks["B"]] == entry
    assert all(isinstance(x.downsample, nn.Sequential) for x in blocks["C"])
    assert all(type(x) is fnn.PlainBasicBlock and x.downsample is None for x in blocks["P"])
    assert sum(t.numel() for t in a.parameters()) < sum(t.numel() for t in b.parameters()) < sum(
        t.numel() for t in c.parameters())
    assert "layer2.0.downsample.0.weight" in b.state_dict() and "layer1.0.downsample.1.running_mean" in c.state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["A", "B", "C", "plain"])
def test_matches_eager_forward_train_and_eval(variant, backend):
    torch.manual_seed(0)
    kw = dict(plain=True) if variant == "plain" else dict(shortcut=variant)
    fused = models.cifar_resnet(20, backend=backend, **kw).double()
    randomize_norms(fused)
    ref = copy.deepcopy(fused)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    for train in (True, False):
        fused.train(train)
        ref.train(train)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = eager_forward(ref, xr), fused(xf)
        close(yf, yr, f"{variant} train={train} logits")
        g = torch.randn_like(yr)
        yr.backward(g)
        yf.backward(g)
        close(xf.grad, xr.grad, "grad x")
        for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
            close(p.grad, q.grad, f"grad {name}")
        for (name, b), c in zip(fused.named_buffers(), ref.buffers(), strict=True):
            close(b, c, f"buffer {name}")


@requires_c
def test_option_a_eval_is_one_op_per_conv():
    m = models.cifar_resnet20(backend="cpu").eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        m(x)
        with OpRecorder() as rec:
            m(x)
    # 19 convs; the two identity blocks after each stage's first end in their input's memory (the
    # option-A shortcut is a foreign module's output: never written).
    assert rec.ops.count("fused_resnet.conv_bn_act") == 13
    assert rec.ops.count("fused_resnet.conv_bn_act_residual_") == 6
    assert not {"aten.native_batch_norm", "aten._native_batch_norm_legit_no_training", "aten.relu",
                "aten.add", "aten.convolution"} & set(rec.ops)


def test_pad_shortcut():
    x = torch.randn(2, 4, 5, 5)
    y = models.PadShortcut(4, 8, 2)(x)
    assert y.shape == (2, 8, 3, 3) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2]) and not y[:, 4:].any()
    assert not list(models.PadShortcut(4, 8).parameters())
    with pytest.raises(ValueError, match="out_channels"):
        models.PadShortcut(8, 4)


def test_zero_init_and_weights_round_trip(tmp_path):
    m = models.cifar_resnet20(zero_init_residual=True, num_classes=100)
    assert all(not b.bn2.weight.any() for s in (m.layer1, m.layer2, m.layer3) for b in s)
    randomize_norms(m)
    torch.save(m.state_dict(), tmp_path / "r20.pth")
    n = models.cifar_resnet20(weights=tmp_path / "r20.pth")
    assert n.fc.out_features == 100
    for (k, a), b in zip(m.state_dict().items(), n.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="missing keys: layer2.0.downsample.0.weight"):
        models.cifar_resnet20(shortcut="B", weights=m.state_dict())


def test_bad_arguments_named():
    with pytest.raises(ValueError, match="depth: expected 6n \\+ 2"):
        models.cifar_resnet(21)
    with pytest.raises(ValueError, match="shortcut: expected 'A', 'B' or 'C'"):
        models.cifar_resnet20(shortcut="D")
    with pytest.raises(ValueError, match="backend"):
        models.cifar_plain20(backend="fast")
    with pytest.raises(ValueError, match="4-D input"):
        models.cifar_resnet20()(torch.randn(3, 32, 32))
