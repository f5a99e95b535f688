"""Fused blocks vs torchvision's: outputs, every gradient, running stats; eval op counts; fold cache."""

from __future__ import annotations

import copy
import functools
import io
import warnings

import pytest
import torch
from conftest import OpRecorder, requires_c
from conftest import randomize_norms as shared_randomize_norms
from torch import nn
from torchvision.models import resnet as tv
from torchvision.ops import FrozenBatchNorm2d

from fused_resnet import nn as fnn
from fused_resnet.backends import FallbackWarning

CL = torch.channels_last
BACKENDS = ["torch", pytest.param("cpu", marks=requires_c)]

# (kind, inplanes, planes, stride, projection, groups, base_width, dilation, n, h, w)
CASES = {
    "basic-identity": ("basic", 8, 8, 1, False, 1, 64, 1, 2, 9, 9),
    "basic-s2-proj": ("basic", 8, 16, 2, True, 1, 64, 1, 2, 9, 7),
    "bottleneck-s2-proj": ("bottleneck", 16, 8, 2, True, 1, 64, 1, 2, 8, 8),
    "bottleneck-identity-n1": ("bottleneck", 32, 8, 1, False, 1, 64, 1, 1, 5, 6),
    "resnext-groups4": ("bottleneck", 16, 16, 1, True, 4, 16, 1, 2, 6, 6),
    "bottleneck-dilation2": ("bottleneck", 32, 8, 1, False, 1, 64, 2, 2, 7, 7),
}



randomize_norms = functools.partial(shared_randomize_norms, seed=1234)


def make_pair(case: str, backend: str, dtype=torch.float64, norm_layer=None):
    kind, inplanes, planes, stride, proj, groups, base_width, dilation, n, h, w = CASES[case]
    tv_cls, f_cls = (tv.BasicBlock, fnn.BasicBlock) if kind == "basic" else (tv.Bottleneck, fnn.Bottleneck)
    norm = norm_layer or nn.BatchNorm2d

    def downsample():
        if not proj:
            return None
        return nn.Sequential(nn.Conv2d(inplanes, planes * tv_cls.expansion, 1, stride, bias=False),
                             norm(planes * tv_cls.expansion))

    ref = tv_cls(inplanes, planes, stride, downsample(), groups, base_width, dilation, norm_layer).to(dtype)
    randomize_norms(ref)
    fused = f_cls(inplanes, planes, stride, downsample(), groups, base_width, dilation, norm_layer,
                  backend=backend).to(dtype)
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(n, inplanes, h, w, dtype=dtype).contiguous(memory_format=CL)
    return ref, fused, x


def tol(dtype):
    return 1e-9 if dtype == torch.float64 else 2e-4


def close(a, b, dtype, what):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    mag = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    assert err <= tol(dtype) * mag, f"{what}: error {err:.3e} (magnitude {mag:.3e})"


def run_and_compare(ref, fused, x, dtype, steps=1):
    """Forward + backward both modules ``steps`` times; compare outputs, input/parameter grads, buffers."""
    for step in range(steps):
        xr = x.clone().requires_grad_()
        xf = x.clone().requires_grad_()
        yr, yf = ref(xr), fused(xf)
        close(yf, yr, dtype, f"step {step} output")
        g = torch.randn_like(yr)
        yr.backward(g)
        yf.backward(g)
        close(xf.grad, xr.grad, dtype, f"step {step} grad x")
    rp, fp = dict(ref.named_parameters()), dict(fused.named_parameters())
    assert rp.keys() == fp.keys()
    for name in rp:
        assert (rp[name].grad is None) == (fp[name].grad is None), name
        if rp[name].grad is not None:
            close(fp[name].grad, rp[name].grad, dtype, f"grad {name}")
    rb, fb = dict(ref.named_buffers()), dict(fused.named_buffers())
    assert rb.keys() == fb.keys()
    for name in rb:
        close(fb[name], rb[name], dtype, f"buffer {name}")
    return yf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_train_matches_torchvision(case, backend):
    ref, fused, x = make_pair(case, backend)
    ref.train()
    fused.train()
    y = run_and_compare(ref, fused, x, torch.float64, steps=2)
    assert y.is_contiguous(memory_format=CL)
    for name, buf in fused.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert buf.item() == 2, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_eval_matches_torchvision(case, backend):
    ref, fused, x = make_pair(case, backend)
    ref.eval()
    fused.eval()
    run_and_compare(ref, fused, x, torch.float64, steps=2)
    with torch.no_grad():
        close(fused(x), ref(x), torch.float64, "no_grad output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_train_and_eval(backend):
    ref, fused, x = make_pair("bottleneck-s2-proj", backend, dtype=torch.float32)
    run_and_compare(ref, fused, x, torch.float32)
    ref.eval()
    fused.eval()
    run_and_compare(ref, fused, x, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_cumulative_average(backend):
    norm = functools.partial(nn.BatchNorm2d, momentum=None)
    ref, fused, x = make_pair("basic-s2-proj", backend, norm_layer=norm)
    run_and_compare(ref, fused, x, torch.float64, steps=3)
    assert fused.bn1.num_batches_tracked.item() == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_running_stats_uses_batch_stats(backend, mode):
    norm = functools.partial(nn.BatchNorm2d, track_running_stats=False)
    ref, fused, x = make_pair("bottleneck-s2-proj", backend, norm_layer=norm)
    ref.train(mode == "train")
    fused.train(mode == "train")
    run_and_compare(ref, fused, x, torch.float64)
    assert fused.bn1.running_mean is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["basic-s2-proj", "bottleneck-s2-proj"])
def test_frozen_bn_folded_with_gradients(case, backend):
    ref, fused, x = make_pair(case, backend, norm_layer=FrozenBatchNorm2d)
    ref.train()
    fused.train()  # FrozenBatchNorm2d folds in training too
    run_and_compare(ref, fused, x, torch.float64, steps=2)
    assert fused.conv1.weight.grad is not None and fused.conv1.weight.grad.abs().sum() > 0


@requires_c
def test_frozen_bn_training_is_one_op_per_unit():
    _, fused, x = make_pair("bottleneck-s2-proj", "cpu", norm_layer=FrozenBatchNorm2d)
    fused.train()
    xf = x.clone().requires_grad_()
    fused(xf)  # warm the fold cache
    with OpRecorder() as rec:
        fused(xf)
    assert [op for op in rec.ops if op != "aten.detach"] == ["fused_resnet.conv_bn_act"] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_groupnorm_runs_unfused_with_warning(backend):
    norm = functools.partial(nn.GroupNorm, 2)
    ref, fused, x = make_pair("basic-s2-proj", backend, norm_layer=norm)
    assert "GroupNorm" in fused.unfused_reason()
    with pytest.warns(FallbackWarning, match="GroupNorm"):
        y = fused(x)
    close(y, ref(x), torch.float64, "GroupNorm block output")
    run_and_compare(ref, fused, x, torch.float64)


# ----------------------------------------------------------------------------- op counts


EVAL_OPS = {"basic-identity": 2, "basic-s2-proj": 3, "bottleneck-s2-proj": 4, "bottleneck-identity-n1": 3,
            "resnext-groups4": 4, "bottleneck-dilation2": 3}


@requires_c
@pytest.mark.parametrize("case", list(EVAL_OPS))
def test_eval_is_one_fused_op_per_unit(case):
    _, fused, x = make_pair(case, "cpu", dtype=torch.float32)
    fused.eval()
    with torch.no_grad():
        fused(x)  # first call folds and caches
        with OpRecorder() as rec:
            fused(x)
    # A projection block's end is written into its own (dead) shortcut: conv_bn_act_residual_.
    n = EVAL_OPS[case]
    proj = int(fused.downsample is not None)
    assert sorted(rec.ops) == sorted(["fused_resnet.conv_bn_act"] * (n - proj)
                                     + ["fused_resnet.conv_bn_act_residual_"] * proj)


@requires_c
def test_eval_with_gradients_runs_no_elementwise_op():
    """With autograd recording (BN weight/bias trainable) the unit is still its one fused op;
    only ``detach`` aliases of the cached fold run besides it."""
    _, fused, x = make_pair("basic-s2-proj", "cpu", dtype=torch.float32)
    fused.eval()
    fused(x)
    with OpRecorder() as rec:
        fused(x.requires_grad_())
    assert [op for op in rec.ops if op != "aten.detach"] == ["fused_resnet.conv_bn_act"] * 3


@requires_c
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_train_op_sequence(kind):
    case = "basic-s2-proj" if kind == "basic" else "bottleneck-s2-proj"
    _, fused, x = make_pair(case, "cpu", dtype=torch.float32)
    fused.train()
    with OpRecorder() as rec:
        fused(x)
    ops = [op for op in rec.ops if op != "aten.detach"]
    units = 2 if kind == "basic" else 3
    per_unit = ["fused_resnet.conv_stats", "fused_resnet.bn_finalize", "fused_resnet.bn_update_running_stats"]
    # main-path units, then the projection shortcut's unit, then one bn_add_act ("dual BN")
    assert ops == per_unit * (units + 1) + ["fused_resnet.bn_add_act"]


# ----------------------------------------------------------------------------- fold cache


@pytest.mark.parametrize("backend", BACKENDS)
def test_fold_cache_follows_parameter_and_buffer_changes(backend):
    ref, fused, x = make_pair("basic-s2-proj", backend)
    ref.eval()
    fused.eval()
    with torch.no_grad():
        close(fused(x), ref(x), torch.float64, "initial")
        for m in (ref, fused):  # in-place edits of a parameter and of a buffer
            m.bn2.weight.mul_(-1.5)
            m.downsample[1].running_var.add_(2.0)
        close(fused(x), ref(x), torch.float64, "after in-place edits")
        other = copy.deepcopy(ref)
        randomize_norms(other)
        for m in other.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(1.0)
        fused.load_state_dict(other.state_dict())
        close(fused(x), other(x), torch.float64, "after load_state_dict")
        fused.float()
        other.float()
        close(fused(x.float()), other(x.float()), torch.float32, "after .float()")
        fused.bn1.eps = 0.5
        other.bn1.eps = 0.5
        close(fused(x.float()), other(x.float()), torch.float32, "after changing eps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_finetuning_steps_have_fresh_folds(backend):
    """BN in eval, affine parameters trained by SGD: every step's fold and gradients are fresh."""
    ref, fused, x = make_pair("bottleneck-s2-proj", backend)
    ref.eval()
    fused.eval()
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05)
    for _ in range(3):
        for opt in (opt_r, opt_f):
            opt.zero_grad()
        run_and_compare(ref, fused, x, torch.float64)
        opt_r.step()
        opt_f.step()
    close(fused.bn3.weight, ref.bn3.weight, torch.float64, "bn3.weight after steps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_fold_not_reused_for_autograd(backend):
    ref, fused, x = make_pair("basic-s2-proj", backend, norm_layer=FrozenBatchNorm2d)
    with torch.inference_mode():
        fused(x)
    run_and_compare(ref, fused, x, torch.float64)


def test_deepcopy_and_pickle_do_not_share_caches():
    _, fused, x = make_pair("basic-identity", "torch")
    fused.eval()
    with torch.no_grad():
        y = fused(x)
        clone = copy.deepcopy(fused)
        clone.bn2.weight.mul_(2)
        assert not torch.allclose(clone(x), y)
        close(fused(x), y, torch.float64, "original after editing the copy")
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        cache = loaded._fold_caches["conv1"]
        assert cache._entry is None and cache._entry_inference is None  # the cache is not pickled
        close(loaded(x), y, torch.float64, "after a pickle round trip")


# ----------------------------------------------------------------------------- adoption


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_from_module_adopts_the_same_modules(kind):
    case = "basic-s2-proj" if kind == "basic" else "bottleneck-s2-proj"
    ref, _, x = make_pair(case, "torch")
    cls = fnn.BasicBlock if kind == "basic" else fnn.Bottleneck
    ref.eval()
    fused = cls.from_module(ref, backend="torch")
    assert fused.backend == "torch" and not fused.training
    for name in ("conv1", "bn1", "conv2", "bn2", "downsample") + (("conv3", "bn3") if kind != "basic" else ()):
        assert getattr(fused, name) is getattr(ref, name), name
    assert fused.stride == 2
    assert list(fused.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        y0 = ref(x)
        close(fused(x), y0, torch.float64, "adopted block output")
        ref.conv1.weight.mul_(0.5)  # shared parameters: the fused block sees the edit
        close(fused(x), ref(x), torch.float64, "after editing the source block")


def test_from_module_timm_blocks():
    timm_resnet = pytest.importorskip("timm.models.resnet")
    torch.manual_seed(0)
    blocks = [
        timm_resnet.BasicBlock(8, 16, stride=2, downsample=timm_resnet.downsample_conv(8, 16, 1, stride=2)),
        timm_resnet.Bottleneck(16, 8, stride=2, downsample=timm_resnet.downsample_avg(16, 32, 1, stride=2)),
        timm_resnet.Bottleneck(32, 8),
    ]
    for block in blocks:
        block = block.double()
        randomize_norms(block)
        fused = (fnn.Bottleneck if hasattr(block, "conv3") else fnn.BasicBlock).from_module(
            copy.deepcopy(block), backend="torch")
        x = torch.randn(2, block.conv1.in_channels, 8, 8, dtype=torch.float64)
        for train in (True, False):
            block.train(train)
            fused.train(train)
            run_and_compare(block, fused, x, torch.float64)


def test_from_module_refuses_what_it_cannot_fuse():
    timm_resnet = pytest.importorskip("timm.models.resnet")
    gn = tv.BasicBlock(8, 8, norm_layer=functools.partial(nn.GroupNorm, 2))
    with pytest.raises(ValueError, match="bn1: GroupNorm"):
        fnn.BasicBlock.from_module(gn)
    with pytest.raises(ValueError, match="act1 is SiLU"):
        fnn.Bottleneck.from_module(timm_resnet.Bottleneck(32, 8, act_layer=nn.SiLU))
    with pytest.raises(ValueError, match="'se'"):
        fnn.BasicBlock.from_module(timm_resnet.BasicBlock(8, 8, attn_layer="se"))
    with pytest.raises(ValueError, match="conv3"):
        fnn.Bottleneck.from_module(tv.BasicBlock(8, 8))
    with pytest.raises(ValueError, match="Bottleneck.from_module"):
        fnn.BasicBlock.from_module(tv.Bottleneck(32, 8))
    with pytest.raises(ValueError, match="padding_mode"):
        block = tv.BasicBlock(8, 8)
        block.conv2.padding_mode = "reflect"
        fnn.BasicBlock.from_module(block)
    with pytest.raises(ValueError, match="nn.Module"):
        fnn.BasicBlock.from_module("block")


class _ScaledPool(nn.Module):
    """A downsample that is not a (conv, BN) pair: runs as given, added as a plain residual."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.pool = nn.AvgPool2d(2, ceil_mode=True)
        self.proj = nn.Conv2d(c_in, c_out, 1, bias=True)

    def forward(self, x):
        return self.proj(self.pool(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_downsample_is_a_plain_residual(backend):
    ref = tv.BasicBlock(8, 16, 2, _ScaledPool(8, 16)).double()
    randomize_norms(ref)
    fused = fnn.BasicBlock.from_module(copy.deepcopy(ref), backend=backend)
    assert fnn.split_downsample(fused.downsample) is None
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    for train in (True, False):
        ref.train(train)
        fused.train(train)
        run_and_compare(ref, fused, x, torch.float64)


# ----------------------------------------------------------------------------- ConvBNAct


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_convbnact_matches_eager(backend, relu, bias):
    m = fnn.ConvBNAct(5, 7, kernel_size=3, stride=2, relu=relu, bias=bias, backend=backend).double()
    randomize_norms(m)
    ref = nn.Sequential(copy.deepcopy(m.conv), copy.deepcopy(m.bn), nn.ReLU() if relu else nn.Identity())
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    for train in (True, False):
        m.train(train)
        ref.train(train)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = ref(xr), m(xf)
        close(yf, yr, torch.float64, f"ConvBNAct train={train}")
        yr.sum().backward()
        yf.sum().backward()
        close(xf.grad, xr.grad, torch.float64, "grad x")
        for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
            close(p.grad, q.grad, torch.float64, f"grad {name}")
    close(m.bn.running_mean, ref[1].running_mean, torch.float64, "running_mean (conv bias included)")


def test_convbnact_from_modules_shares_and_refuses():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    m = fnn.ConvBNAct.from_modules(conv, bn, relu=False, backend="torch")
    assert m.conv is conv and m.bn is bn and m.relu is False
    with pytest.raises(ValueError, match="bn: GroupNorm"):
        fnn.ConvBNAct.from_modules(conv, nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="conv: expected an nn.Conv2d"):
        fnn.ConvBNAct.from_modules(nn.Linear(3, 4), bn)


@requires_c
def test_convbnact_eval_is_one_op():
    m = fnn.ConvBNAct(3, 8, 7, stride=2, backend="cpu").eval()
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=CL)
    with torch.no_grad():
        m(x)
        with OpRecorder() as rec:
            m(x)
    assert rec.ops == ["fused_resnet.conv_bn_act"]


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_named():
    block = fnn.BasicBlock(8, 8)
    with pytest.raises(ValueError, match="4-D input"):
        block(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match="expected 8 input channels"):
        block(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        fnn.Bottleneck(8, 8, backend="tpu")
    with pytest.raises(ValueError, match="backend"):
        fnn.ConvBNAct(3, 4, backend="nope")
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        fnn.BasicBlock(8, 8, groups=2)
    with pytest.raises(ValueError, match="downsample"):
        fnn.PlainBasicBlock(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16)))
    with pytest.raises(ValueError, match="count"):  # one value per channel in training, as nn.BatchNorm2d
        fnn.BasicBlock(4, 4)(torch.randn(1, 4, 1, 1))


def test_subclass_of_torchvision_blocks():
    assert issubclass(fnn.BasicBlock, tv.BasicBlock) and issubclass(fnn.Bottleneck, tv.Bottleneck)
    assert fnn.BasicBlock.expansion == 1 and fnn.Bottleneck.expansion == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fnn.Bottleneck(64, 16)  # a fusable block warns nothing
