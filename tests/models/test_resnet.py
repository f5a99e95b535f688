"""fused_resnet.models ResNet family vs torchvision: keys, builder arguments, outputs, weights loading."""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
import torchvision
from conftest import OpRecorder, close, requires_c
from conftest import randomize_norms as shared_randomize_norms
from torchvision.models import resnet as tv
from torchvision.ops import FrozenBatchNorm2d

from fused_resnet import models
from fused_resnet import nn as fnn

CL = torch.channels_last
BACKENDS = ["torch", pytest.param("cpu", marks=requires_c)]
BUILDERS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
            "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]



randomize_norms = functools.partial(shared_randomize_norms, seed=99)



def compare_models(ref, fused, x, steps=1, rtol=1e-9):
    for step in range(steps):
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = ref(xr), fused(xf)
        close(yf, yr, f"step {step} logits", rtol)
        g = torch.randn_like(yr)
        yr.backward(g)
        yf.backward(g)
        close(xf.grad, xr.grad, f"step {step} grad x", rtol)
    for (name, p), (name2, q) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
        assert name == name2
        if p.grad is None:
            assert q.grad is None, name
        else:
            close(q.grad, p.grad, f"grad {name}", rtol)
    for (name, b), (_, c) in zip(ref.named_buffers(), fused.named_buffers(), strict=True):
        close(c, b, f"buffer {name}", rtol)


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_keys_and_shapes_match_torchvision(name):
    with torch.device("meta"):
        ref = getattr(torchvision.models, name)()
        fused = getattr(models, name)()
    rs, fs = ref.state_dict(), fused.state_dict()
    assert list(fs) == list(rs)
    assert all(fs[k].shape == rs[k].shape and fs[k].dtype == rs[k].dtype for k in rs)
    assert sum(isinstance(m, (fnn.BasicBlock, fnn.Bottleneck)) for m in fused.modules()) == sum(
        isinstance(m, (tv.BasicBlock, tv.Bottleneck)) for m in ref.modules())


def test_resnet50_strict_load_both_ways():
    torch.manual_seed(0)
    ref = torchvision.models.resnet50()
    fused = models.resnet50()
    fused.load_state_dict(ref.state_dict(), strict=True)
    back = torchvision.models.resnet50()
    back.load_state_dict(fused.state_dict(), strict=True)
    for (k, a), b in zip(ref.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_builder_arguments_as_torchvision():
    torch.manual_seed(0)
    m = models.resnet18(num_classes=7, zero_init_residual=True)
    assert m.fc.out_features == 7
    assert all(b.bn2.weight.abs().sum() == 0 for b in m.modules() if isinstance(b, fnn.BasicBlock))
    with torch.device("meta"):
        d = models.resnet50(replace_stride_with_dilation=[False, True, True], norm_layer=FrozenBatchNorm2d)
        x = models.resnext50_32x4d()
    assert d.layer4[0].conv2.dilation == (2, 2) and d.layer4[1].conv2.dilation == (4, 4)
    assert isinstance(d.layer1[0].bn1, FrozenBatchNorm2d)
    assert x.layer1[0].conv2.groups == 32 and x.layer1[0].conv2.out_channels == 128
    with pytest.raises(ValueError, match="width_per_group"):
        models.wide_resnet50_2(width_per_group=64)


def _small(block, backend, dtype=torch.float64, **kw):
    ref = tv.ResNet(block, [1, 1, 1, 1], num_classes=5, **kw).to(dtype)
    randomize_norms(ref)
    fused = models.ResNet(block, [1, 1, 1, 1], num_classes=5, backend=backend, **kw).to(dtype)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resnet18_matches_torchvision(backend, mode):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).double()
    randomize_norms(ref)
    fused = models.resnet18(num_classes=10, backend=backend).double()
    fused.load_state_dict(ref.state_dict())
    ref.train(mode == "train")
    fused.train(mode == "train")
    x = torch.randn(3, 3, 16, 24, dtype=torch.float64)  # layer4 is 1x1: small, and BN still sees 3 values
    compare_models(ref, fused, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["resnext", "dilated"])
def test_bottleneck_models_match_torchvision(backend, variant):
    torch.manual_seed(0)
    kw = dict(groups=4, width_per_group=8) if variant == "resnext" else dict(
        width_per_group=16, replace_stride_with_dilation=[False, True, True])
    ref, fused = _small(tv.Bottleneck, backend, **kw)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for mode in (True, False):
        ref.train(mode)
        fused.train(mode)
        compare_models(ref, fused, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_bn_model_trains_through_fold(backend):
    torch.manual_seed(0)
    ref, fused = _small(tv.BasicBlock, backend, norm_layer=FrozenBatchNorm2d)
    ref.train()
    fused.train()
    compare_models(ref, fused, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert fused.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_model_eval(backend):
    """float32 inference (training-mode float32 is covered per block and by the convergence test)."""
    torch.manual_seed(0)
    ref, fused = _small(tv.Bottleneck, backend, dtype=torch.float32, width_per_group=16)
    ref.eval()
    fused.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(fused(x), ref(x), "float32 eval logits", rtol=2e-5)


def test_nchw_input_converted_once_and_blocks_stay_channels_last():
    torch.manual_seed(0)
    ref, fused = _small(tv.BasicBlock, "torch")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    layouts = []
    for m in fused.modules():
        if isinstance(m, fnn.BasicBlock):
            m.register_forward_hook(lambda mod, inp, out: layouts.append(
                (inp[0].is_contiguous(memory_format=CL), out.is_contiguous(memory_format=CL))))
    fused.eval()
    ref.eval()
    with torch.no_grad():
        close(fused(x), ref(x), "NCHW input")
    assert layouts and all(i and o for i, o in layouts), layouts


@requires_c
@pytest.mark.parametrize("plans", ["0", "1"])
def test_eval_model_runs_no_unfused_bn_add_relu(plans, monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_FAST_EVAL", plans)
    fused = models.resnet18(num_classes=10, backend="cpu").eval()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=CL)
    with torch.no_grad():
        fused(x)
        with OpRecorder() as rec:
            fused(x)
    forbidden = {"aten.native_batch_norm", "aten._native_batch_norm_legit_no_training", "aten.batch_norm",
                 "aten.relu", "aten.relu_", "aten.threshold", "aten.add", "aten.add_", "aten.convolution"}
    assert not forbidden & set(rec.ops), sorted(forbidden & set(rec.ops))
    # stem 1 + 8 blocks x 2 + 3 projection shortcuts
    if plans == "0":
        assert rec.ops.count("fused_resnet.conv_bn_act") == 20
        assert "aten.clamp_min" not in rec.ops
    else:
        # The CPU eval plan runs the stem (conv1 + bn1 + relu + maxpool) in oneDNN's blocked layout
        # (fused_resnet.nn._onednn_stem): one oneDNN convolution with BN folded in, the pool, and the
        # ReLU in the pass that writes the channels_last result -- no other elementwise op.
        # Block ends written into a dead shortcut: 3 projections + each stage's second block.
        assert rec.ops.count("fused_resnet.conv_bn_act") == 19 - 7
        assert rec.ops.count("fused_resnet.conv_bn_act_residual_") == 7
        assert rec.ops.count("aten.mkldnn_convolution") == 1
        assert rec.ops.count("aten.clamp_min") == 1


def test_backend_attribute_propagates():
    m = models.resnet18(num_classes=3)
    assert m.backend is None
    m.backend = "torch"
    fused = [x for x in m.modules() if isinstance(x, fnn.BasicBlock)]
    assert len(fused) == 8 and all(b.backend == "torch" for b in fused)
    with pytest.raises(ValueError, match="backend"):
        m.backend = "gpu"
    with pytest.raises(ValueError, match="backend"):
        models.resnet18(backend="bogus")


def test_bad_input_named():
    m = models.resnet18(num_classes=3)
    with pytest.raises(ValueError, match="4-D input"):
        m(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="expected 3 input channels"):
        m(torch.randn(1, 1, 32, 32))


# ----------------------------------------------------------------------------- weights


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """A private torch hub directory; any attempt to download fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("fused_resnet tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def test_weights_enum_from_local_hub_cache(hub_dir):
    torch.manual_seed(0)
    weights = tv.ResNet18_Weights.IMAGENET1K_V1
    src = torchvision.models.resnet18()
    os.makedirs(hub_dir / "checkpoints")
    torch.save(src.state_dict(), hub_dir / "checkpoints" / os.path.basename(weights.url))
    for w in (weights, "DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        m = models.resnet18(weights=w)
        assert m.fc.out_features == 1000
        for (k, a), b in zip(src.state_dict().items(), m.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="num_classes"):
        models.resnet18(weights=weights, num_classes=10)


def test_weights_enum_missing_file_says_where(hub_dir):
    weights = tv.ResNet50_Weights.IMAGENET1K_V2
    expected = str(hub_dir / "checkpoints" / os.path.basename(weights.url))
    with pytest.raises(FileNotFoundError) as err:
        models.resnet50(weights=weights)
    assert expected in str(err.value) and "never downloads" in str(err.value)
    with pytest.raises((TypeError, ValueError)):
        models.resnet50(weights=tv.ResNet18_Weights.IMAGENET1K_V1)  # another architecture's weights


def test_weights_from_path_and_state_dict(tmp_path):
    torch.manual_seed(0)
    src = torchvision.models.resnet18(num_classes=10)
    randomize_norms(src)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    for w in (path, str(path), src.state_dict()):
        m = models.resnet18(weights=w)
        assert m.fc.out_features == 10  # read from fc.weight
        for (k, a), b in zip(src.state_dict().items(), m.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="not a file"):
        models.resnet18(weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="num_classes"):
        models.resnet18(weights=path, num_classes=5)


def test_state_dict_with_wrong_keys_is_named():
    sd = copy.copy(models.resnet18(num_classes=4).state_dict())
    del sd["layer2.0.downsample.1.running_var"]
    sd["layer9.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: layer2\.0\.downsample\.1\.running_var.*unexpected keys: "
                                         r"layer9\.weight"):
        models.resnet18(weights=sd)
    with pytest.raises(RuntimeError, match="layer9.weight"):  # plain load_state_dict: torch's own message
        models.resnet18(num_classes=4).load_state_dict(sd)
