"""fuse(model) / unfuse(model): torchvision and timm ResNets, user models, the fusion report.

Every comparison is against the unfused model itself (PyTorch's own modules) on fresh random
inputs, with BatchNorm parameters and running statistics randomized (never the init's 1/0), so
that a BN that is skipped, applied twice or folded with the wrong statistics shows. Spatial sizes
are small (48x48 or 32x32, batch 2) to fit the CPU budget; the block configurations are the real ones.
"""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv
from torchvision.ops import FrozenBatchNorm2d

import fused_resnet.nn as fnn
from fused_resnet import backends
from fused_resnet.convert import FoldedBatchNorm2d, FoldedReLU, FoldedSyncBatchNorm, FusedConv2d, fuse, unfuse
from fused_resnet.functional import compiled_ops_available

timm = pytest.importorskip("timm")

CL = torch.channels_last


# ----------------------------------------------------------------------------- helpers


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BN weight/bias/running statistics (and num_batches_tracked) in every norm layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if getattr(m, "num_batches_tracked", None) is not None:
                    m.num_batches_tracked.fill_(int(torch.randint(1, 100, (1,), generator=g)))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of ``a`` against ``b`` (relative to at least 1e-3, so that a
    gradient that is zero in exact arithmetic -- a conv bias before a training-mode BN -- compares
    its rounding noise absolutely)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-3)).item()


def assert_close_rel(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, what
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_state_equal(a: nn.Module, b: nn.Module, tol: float = 0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if tol == 0.0 or not sa[k].is_floating_point():
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=k)


def check_eval(original: nn.Module, fused: nn.Module, x: torch.Tensor, tol: float = 2e-5):
    original.eval()
    fused.eval()
    with torch.no_grad():
        expected = original(x)
        actual = fused(x)
    assert_close_rel(actual, expected, tol, "eval output")


def check_train(original: nn.Module, fused: nn.Module, x: torch.Tensor, tol: float, seed: int = 3):
    """One training step on both: outputs, every parameter's gradient, every buffer."""
    original.train()
    fused.train()
    original.zero_grad(set_to_none=True)
    fused.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # stochastic skipped blocks (drop_path) draw the same numbers in both
    expected = original(x)
    w = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    (expected * w).sum().backward()
    torch.manual_seed(seed)
    actual = fused(x)
    (actual * w).sum().backward()
    assert_close_rel(actual, expected, tol, "train output")
    po, pf = dict(original.named_parameters()), dict(fused.named_parameters())
    assert list(po) == list(pf)
    for k in po:
        assert pf[k].grad is not None, f"no gradient for {k}"
        assert_close_rel(pf[k].grad, po[k].grad, tol, f"grad of {k}")
    check_buffers(original, fused, tol)


def check_buffers(original: nn.Module, fused: nn.Module, tol: float):
    bo, bf = dict(original.named_buffers()), dict(fused.named_buffers())
    assert list(bo) == list(bf)
    for k in bo:
        if bo[k].is_floating_point():
            assert_close_rel(bf[k], bo[k], tol, f"buffer {k}")
        else:
            assert torch.equal(bf[k], bo[k]), k


def check_model(original: nn.Module, fused: nn.Module, x: torch.Tensor, eval_tol: float = 2e-5):
    """Fused vs original: float32 eval output; float32 training-mode output and running statistics
    after one step; and a float64 training step comparing outputs, every gradient and every
    buffer tightly.

    Why gradients in float64: a ReLU whose input is within float32 rounding of zero (values of
    4e-6 occur at these sizes) flips its mask between two correct float32 implementations and
    moves a whole channel's gradient -- eager float32 PyTorch itself then differs from a float64
    reference by 1e-2. In float64 the comparison is exact up to 1e-9 and checks the conversion,
    including ``.double()`` of a fused model."""
    original64, fused64 = copy.deepcopy(original).double(), copy.deepcopy(fused).double()
    check_eval(original, fused, x, eval_tol)
    original.train()
    fused.train()
    torch.manual_seed(3)
    with torch.no_grad():
        expected = original(x)
    torch.manual_seed(3)
    with torch.no_grad():
        actual = fused(x)
    # 1e-3: training-mode BN over few values per channel (2 in the last stage at 32x32) amplifies
    # float32 rounding, which changes with the thread count; exactness is checked in float64 below
    assert_close_rel(actual, expected, 1e-3, "float32 train output")
    check_buffers(original, fused, 1e-4)
    check_train(original64, fused64, x.double(), tol=1e-9)


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def small_bottleneck_resnet(**kw) -> tv.ResNet:
    """torchvision's ResNet-50-family network with one block per stage (same block configs)."""
    return tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], num_classes=10, **kw)


@pytest.fixture
def x48():
    """(2, 3, 48, 48): the last stage of a ResNet still sees 2x2 pixels (8 values per channel in
    training-mode BN)."""
    return torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def x32():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))


# ----------------------------------------------------------------------------- torchvision


def test_torchvision_resnet18_eval_train_report_keys(x48):
    torch.manual_seed(0)
    model = randomize_bn(tv.resnet18(num_classes=10))
    fused, report = fuse(model)
    assert fused is not model
    names = ["conv1+bn1+relu"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert [e.name for e in report.entries] == names
    assert report.counts == {"fused": 9, "skipped": 0}
    assert report["layer2.0"].reason.startswith("projection shortcut")
    assert report["layer1.0"].reason == "identity shortcut"
    assert isinstance(fused.conv1, FusedConv2d) and isinstance(fused.bn1, FoldedBatchNorm2d)
    assert isinstance(fused.relu, FoldedReLU)
    assert "fused with bn1 + relu, backend=None" in repr(fused.conv1)
    assert all(isinstance(b, fnn.BasicBlock) for s in range(1, 5) for b in getattr(fused, f"layer{s}"))
    assert_state_equal(fused, model)
    check_model(model, fused, x48)


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_torchvision_bottleneck_models_full_size(arch):
    """The real models (random init): report and state_dict (outputs: the training test below
    runs the same block configurations, one block per stage, in train and eval)."""
    torch.manual_seed(0)
    model = randomize_bn(getattr(tv, arch)(num_classes=10))
    fused, report = fuse(model)
    blocks = [f"layer{s}.{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3), strict=True) for b in range(n)]
    assert [e.name for e in report.entries] == ["conv1+bn1+relu"] + blocks
    assert report.counts == {"fused": 17, "skipped": 0}
    assert all(e.fused_as == "fused_resnet.nn.modules.Bottleneck" for e in report.entries[1:])
    assert_state_equal(fused, model)


@pytest.mark.parametrize("kw", [{}, {"groups": 32, "width_per_group": 4}, {"width_per_group": 128}],
                         ids=["resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_torchvision_bottleneck_models_train(kw, x32):
    """Eval and training (outputs, gradients, running stats) on the ResNet-50/ResNeXt/Wide block
    configurations, one block per stage (32x32: float64 grouped convolutions are slow on CPU)."""
    torch.manual_seed(0)
    model = randomize_bn(small_bottleneck_resnet(**kw))
    fused, report = fuse(model)
    assert report.counts == {"fused": 5, "skipped": 0}
    check_model(model, fused, x32)


# ----------------------------------------------------------------------------- timm


def timm_model(name: str, shrink: bool = False, **kw) -> nn.Module:
    """A timm model, random init, never downloaded; ``shrink``: one block per stage."""
    if shrink:
        kw["layers"] = (1, 1, 1, 1)
    return randomize_bn(timm.create_model(name, pretrained=False, num_classes=10, **kw))


def test_timm_resnet18(x32, x48):
    torch.manual_seed(0)
    model = timm_model("resnet18")
    fused, report = fuse(model)
    assert report.entries[0].name == "conv1+bn1+act1"
    assert report.counts == {"fused": 9, "skipped": 0}
    assert all(e.original == "timm.models.resnet.BasicBlock" for e in report.entries[1:])
    assert_state_equal(fused, model)
    check_eval(model, fused, x32)
    small = timm_model("resnet18", shrink=True)
    check_model(small, fuse(small).model, x48)


def test_timm_resnet26d_deep_stem_avg_down(x48):
    torch.manual_seed(0)
    model = timm_model("resnet26d")
    fused, report = fuse(model)
    assert [e.name for e in report.entries[:3]] == ["conv1.0+conv1.1+conv1.2", "conv1.3+conv1.4+conv1.5",
                                                    "conv1.6+bn1+act1"]
    assert report.counts == {"fused": 11, "skipped": 0}
    assert report["layer2.0"].reason == "projection shortcut conv+BN fused (after AvgPool2d)"
    assert isinstance(fused.conv1[6], FusedConv2d) and isinstance(fused.conv1[4], FoldedBatchNorm2d)
    assert_state_equal(fused, model)
    check_eval(model, fused, x48)
    small = timm_model("resnet26d", shrink=True)
    check_model(small, fuse(small).model, x48)


def test_timm_seresnet18_blocks_skipped_with_reason(x32):
    torch.manual_seed(0)
    model = timm_model("seresnet18")
    fused, report = fuse(model)
    assert report.counts == {"fused": 1, "skipped": 8}
    assert report.entries[0].action == "fused"
    for e in report.skipped:
        assert e.original == "timm.models.resnet.BasicBlock"
        assert e.reason == "attention se=SEModule is not fused"
        assert e.fused_as is None
    assert type(fused.layer1[0]) is type(model.layer1[0])
    text = str(report)
    assert "1 fused, 8 skipped" in text and "layer4.1" in text and "se=SEModule" in text
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()
    assert report.to_dict()["counts"] == {"fused": 1, "skipped": 8}
    assert_state_equal(fused, model)
    check_eval(model, fused, x32)  # training with skipped blocks: test_timm_drop_path_blocks_skipped


def test_timm_ecaresnet26t_tiered_stem_and_eca_skipped():
    torch.manual_seed(0)
    model = timm_model("ecaresnet26t")
    fused, report = fuse(model)
    assert [e.action for e in report.entries[:3]] == ["fused"] * 3
    assert report.counts == {"fused": 3, "skipped": 8}
    assert {e.reason for e in report.skipped} == {"attention se=EcaModule is not fused"}
    assert_state_equal(fused, model)


def test_timm_drop_path_blocks_skipped(x48):
    torch.manual_seed(0)
    model = timm_model("resnet18", shrink=True, drop_path_rate=0.2)
    fused, report = fuse(model)
    # timm gives the first block drop_path rate 0 (no DropPath module): that one is fused
    assert [e.action for e in report.entries] == ["fused", "fused", "skipped", "skipped", "skipped"]
    assert [e.reason for e in report.skipped] == [f"drop_path=DropPath({p:.3g}) is not fused"
                                                  for p in (0.2 / 3, 0.4 / 3, 0.2)]
    check_model(model, fused, x48)  # same seed in both: the skipped blocks drop the same samples


def test_timm_other_features_are_reasons():
    """Anti-aliasing and drop-block (built by timm's constructor arguments) are reported."""
    from timm.layers import BlurPool2d, DropBlock2d

    aa = timm.models.resnet.BasicBlock(8, 8, aa_layer=BlurPool2d, stride=2,
                                       downsample=nn.Sequential(nn.Conv2d(8, 8, 1, 2, bias=False), nn.BatchNorm2d(8)))
    db = timm.models.resnet.Bottleneck(32, 8, drop_block=lambda: DropBlock2d(0.1, 3))
    act = timm.models.resnet.BasicBlock(8, 8, act_layer=nn.SiLU)
    _, report = fuse(nn.Sequential(aa, db, act))
    assert report.counts == {"fused": 0, "skipped": 3}
    assert report["0"].reason == "anti-aliasing aa=BlurPool2d is not fused"
    assert report["1"].reason == "drop_block=DropBlock2d is not fused"
    assert report["2"].reason == "act1 is SiLU, not nn.ReLU; act2 is SiLU, not nn.ReLU"


# ----------------------------------------------------------------------------- user models


class OverridingBlock(tv.BasicBlock):
    def forward(self, x):
        return super().forward(x) * 0.5


class PlainSubclassBlock(tv.BasicBlock):
    """A subclass that keeps BasicBlock.forward: fusable."""


class UserNet(nn.Module):
    """A user model built from torchvision blocks, with parts that cannot be fused."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), FrozenBatchNorm2d(16),
                                  nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.body = nn.Sequential(
            tv.BasicBlock(16, 16),
            PlainSubclassBlock(16, 32, stride=2, downsample=down),
            tv.Bottleneck(32, 8, norm_layer=FrozenBatchNorm2d),
            tv.BasicBlock(32, 32, norm_layer=lambda c: nn.GroupNorm(4, c)),
            OverridingBlock(32, 32),
            tv.Bottleneck(32, 8, groups=2, base_width=32),
        )
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_user_model_from_torchvision_blocks(x48):
    torch.manual_seed(0)
    model = randomize_bn(UserNet())
    fused, report = fuse(model)
    assert [(e.name, e.action) for e in report.entries] == [
        ("stem.0+stem.1+stem.2", "fused"), ("stem.3+stem.4+stem.5", "fused"),
        ("body.0", "fused"), ("body.1", "fused"), ("body.2", "fused"),
        ("body.3", "skipped"), ("body.4", "skipped"), ("body.5", "fused")]
    assert "bn1 is torch.nn.modules.normalization.GroupNorm" in report["body.3"].reason
    assert report["body.4"].reason == "OverridingBlock overrides BasicBlock.forward"
    assert type(fused.stem[1]).__name__ == "FoldedFrozenBatchNorm2d"
    assert isinstance(fused.stem[1], FrozenBatchNorm2d)
    assert isinstance(fused.body[1], fnn.BasicBlock) and isinstance(fused.body[2], fnn.Bottleneck)
    assert_state_equal(fused, model)
    check_model(model, fused, x48)


def test_conv_bn_relu_runs_in_sequentials():
    """(Conv2d, BN, ReLU) runs of any nn.Sequential are fused in place (a conv bias is folded);
    a parametrized conv (its class is a generated subclass) and a ReLU object used twice are not."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    shared = nn.ReLU()
    model = randomize_bn(nn.Sequential(
        weight_norm(nn.Conv2d(3, 8, 3, padding=1, bias=False)), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), shared,
                      nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), shared),
        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4),  # no ReLU: not a candidate
    ))
    fused, report = fuse(model)
    assert [(e.name, e.action) for e in report.entries] == [
        ("0+1+2", "skipped"), ("3+4+5", "fused"), ("6.0+6.1+6.2", "skipped"), ("6.3+6.4+6.5", "skipped")]
    assert report["0+1+2"].reason.startswith("0 is ParametrizedConv2d, a subclass of nn.Conv2d")
    assert report["6.0+6.1+6.2"].reason == "6.2 is also registered elsewhere in the model"
    assert isinstance(fused[3], FusedConv2d) and isinstance(fused[5], FoldedReLU)
    assert type(fused[7]) is nn.Conv2d and type(fused[8]) is nn.BatchNorm2d
    check_model(model, fused, torch.randn(2, 3, 12, 12))
    assert module_types(unfuse(fused)) == module_types(model)


def test_fused_model_pickles(x32):
    """torch.save of the whole fused module (FusedConv2d, FoldedFrozenBatchNorm2d, fused blocks)."""
    torch.manual_seed(0)
    model = randomize_bn(UserNet())
    fused, _ = fuse(model)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert module_types(loaded) == module_types(fused)
    check_eval(model, loaded, x32)


def test_single_block_root_and_frozen_bn_modes_kept():
    """The root itself may be a block; BNs frozen one by one (eval inside a training model) stay
    frozen, and the fused block then folds them as PyTorch would use running statistics."""
    torch.manual_seed(0)
    block = randomize_bn(tv.Bottleneck(64, 16))
    block.train()
    block.bn2.eval()
    fused, report = fuse(block)
    assert isinstance(fused, fnn.Bottleneck) and report[""].action == "fused"
    assert fused.training and fused.bn1.training and not fused.bn2.training
    x = torch.randn(2, 64, 16, 16)
    expected, actual = block(x), fused(x)
    assert_close_rel(actual, expected, 1e-5, "frozen-bn2 train output")
    assert_state_equal(fused, block, tol=1e-6)
    back = unfuse(fused)
    assert type(back) is tv.Bottleneck and back.training and not back.bn2.training


# ----------------------------------------------------------------------------- state_dict, inplace, unfuse


def test_state_dict_loads_both_ways_strict(x32):
    torch.manual_seed(0)
    model = randomize_bn(tv.resnet18(num_classes=10))
    other = randomize_bn(tv.resnet18(num_classes=10), seed=5)
    fused, _ = fuse(model)
    fused.load_state_dict(other.state_dict(), strict=True)
    check_eval(other, fused, x32)  # the stem's folded BN and every block use the loaded values
    plain = tv.resnet18(num_classes=10)
    plain.load_state_dict(fused.state_dict(), strict=True)
    assert_state_equal(plain, other)


def test_inplace_semantics():
    torch.manual_seed(0)
    model = randomize_bn(tv.resnet18(num_classes=10))
    before = module_types(model)
    snapshot = copy.deepcopy(model.state_dict())
    fused, _ = fuse(model)  # a copy: the original is untouched and shares nothing
    assert module_types(model) == before
    assert list(model.state_dict()) == list(snapshot)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert fused.conv1.weight is not model.conv1.weight
    assert fused.layer1[0].conv1.weight is not model.layer1[0].conv1.weight

    weight = model.layer1[0].conv1.weight
    stem_weight = model.conv1.weight
    same, report = fuse(model, inplace=True)
    assert same is model and report.counts["fused"] == 9
    assert isinstance(model.layer1[0], fnn.BasicBlock)
    assert model.layer1[0].conv1.weight is weight and model.conv1.weight is stem_weight  # adopted, not copied


def test_unfuse_round_trip(x32):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet26d", pretrained=False, num_classes=10)).eval()
    with torch.no_grad():
        expected = model(x32)
    fused, _ = fuse(model)
    back = unfuse(fused)
    assert back is not fused and isinstance(fused.conv1[0], FusedConv2d)  # unfuse copied
    assert module_types(back) == module_types(model)
    assert_state_equal(back, model)
    with torch.no_grad():
        assert torch.equal(back(x32), expected)  # the very same eager modules and weights

    # in place: the blocks that come back are the fused model's adopted modules (weights exact),
    # also after a weight update made through the fused model
    with torch.no_grad():
        fused.layer1[0].conv2.weight.mul_(1.5)
        fused.conv1[0].weight.add_(0.1)
    conv2 = fused.layer1[0].conv2
    back = unfuse(fused, inplace=True)
    assert back is fused and back.layer1[0].conv2 is conv2
    assert type(back.layer1[0]) is timm.models.resnet.Bottleneck and type(back.conv1[0]) is nn.Conv2d
    assert type(back.bn1) is nn.BatchNorm2d and type(back.act1) is nn.ReLU
    assert module_types(back) == module_types(model)
    with torch.no_grad():
        model.layer1[0].conv2.weight.mul_(1.5)
        model.conv1[0].weight.add_(0.1)
    assert_state_equal(back, model)


def test_fuse_twice_and_unfuse_unfused():
    model = tv.resnet18(num_classes=10)
    fused, _ = fuse(model)
    again, report = fuse(fused)
    assert report.counts == {"fused": 0, "skipped": 9}
    assert {e.reason for e in report.entries} == {"already fused", "already a fused_resnet block"}
    assert module_types(unfuse(model)) == module_types(model)


# ----------------------------------------------------------------------------- backend, layout, errors


def test_backend_stored_and_used(x32):
    torch.manual_seed(0)
    model = randomize_bn(tv.resnet18(num_classes=10)).eval()
    fused, report = fuse(model, backend="torch")
    assert report.backend == "torch"
    fused_mods = [m for m in fused.modules() if isinstance(m, (FusedConv2d, fnn.BasicBlock))]
    assert len(fused_mods) == 9 and all(m.backend == "torch" for m in fused_mods)
    with torch.no_grad(), backends.trace() as log:
        fused(x32)
    assert len(log) == 1 + 8 * 2 + 3  # stem + two units per block + three projection shortcuts
    assert {d.backend for d in log} == {"torch"} and {d.source for d in log} == {"argument"}


def test_backend_that_cannot_run_is_noted():
    _, report = fuse(tv.resnet18(num_classes=10), backend="cuda")
    assert len(report.notes) == 1 and "backend 'cuda' cannot run this model" in report.notes[0]


def test_nchw_input_converted_once(x32):
    """An NCHW input is read into channels_last by the stem; every fused block then receives
    channels_last and returns channels_last."""
    fused, _ = fuse(randomize_bn(tv.resnet18(num_classes=10)).eval())
    seen = []
    for m in fused.modules():
        if isinstance(m, fnn.BasicBlock):
            m.register_forward_hook(lambda mod, inp, out: seen.append(
                (inp[0].is_contiguous(memory_format=CL), out.is_contiguous(memory_format=CL))))
    assert x32.is_contiguous()
    with torch.no_grad():
        fused(x32)
    assert seen == [(True, True)] * 8


def test_bad_input():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got str"):
        fuse("resnet18")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got int"):
        unfuse(3)
    model = tv.resnet18(num_classes=10)
    with pytest.raises(ValueError, match="backend: expected None or one of torch, cpu, cuda, triton"):
        fuse(model, inplace=True, backend="tensorrt")
    assert type(model.layer1[0]) is tv.BasicBlock  # nothing changed before the error
    with pytest.raises(TypeError, match="inplace: expected a bool"):
        fuse(model, inplace="yes")


# ----------------------------------------------------------------------------- SyncBatchNorm and hooks


def small_basic_resnet() -> tv.ResNet:
    """torchvision's ResNet-18 family with one BasicBlock per stage (same block configurations)."""
    return tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10)


def test_sync_batchnorm_model_is_fused_and_reported(x32):
    """A model converted with torch's own nn.SyncBatchNorm.convert_sync_batchnorm: every block and
    the stem fuse, the report says the statistics are synchronized, and without a process group
    the fused model equals the original (nn.SyncBatchNorm is then a plain BatchNorm) in eval and in
    a training step (outputs, every gradient, running statistics)."""
    torch.manual_seed(0)
    model = randomize_bn(nn.SyncBatchNorm.convert_sync_batchnorm(small_basic_resnet()))
    fused, report = fuse(model)
    assert report.counts == {"fused": 5, "skipped": 0}
    for e in report.entries:
        assert "SyncBatchNorm: batch statistics synchronized" in e.reason, e
    assert isinstance(fused.conv1, FusedConv2d) and type(fused.bn1) is FoldedSyncBatchNorm
    assert type(fused.layer2[0].bn1) is nn.SyncBatchNorm and type(fused.layer2[0].downsample[1]) is nn.SyncBatchNorm
    assert_state_equal(fused, model)
    check_model(model, fused, x32)

    back = unfuse(fused)
    assert module_types(back) == module_types(model) and type(back.bn1) is nn.SyncBatchNorm
    assert_state_equal(back, fused)


def test_sync_batchnorm_subclass_with_own_forward_is_skipped():
    class MySync(nn.SyncBatchNorm):
        def forward(self, x):
            return super().forward(x) * 2

    block = tv.BasicBlock(8, 8, norm_layer=MySync)
    _, report = fuse(nn.Sequential(block))
    assert report["0"].action == "skipped"
    assert "bn1 is MySync, a SyncBatchNorm subclass with its own forward" in report["0"].reason


def test_convert_sync_batchnorm_after_fuse(x32):
    """fuse() first, then fused_resnet.nn.convert_sync_batchnorm: the folded stem BN becomes a
    FoldedSyncBatchNorm that the stem's fused op uses, the blocks' BNs become SyncBatchNorm, no
    parameter is copied, the model still equals the original, and unfuse gives SyncBatchNorm back."""
    torch.manual_seed(0)
    model = randomize_bn(small_basic_resnet())
    fused, _ = fuse(model)
    params = {id(p) for p in fused.parameters()}
    fused.layer1.eval()  # a BN frozen by the user keeps its flag
    out = fnn.convert_sync_batchnorm(fused)
    assert out is fused and {id(p) for p in fused.parameters()} == params
    assert type(fused.bn1) is FoldedSyncBatchNorm and type(fused.layer3[0].bn2) is nn.SyncBatchNorm
    assert fused.conv1.__dict__["_fused_resnet_stem"].op.bn is fused.bn1
    assert not fused.layer1[0].bn1.training and fused.layer2[0].bn1.training
    assert not any(type(m) in (nn.BatchNorm2d, FoldedBatchNorm2d) for m in fused.modules())
    assert_state_equal(fused, model)
    fused.train()
    check_model(model, fused, x32)

    back = unfuse(fused)
    assert type(back.conv1) is nn.Conv2d and type(back.bn1) is nn.SyncBatchNorm
    assert type(back.layer1[0]) is tv.BasicBlock and type(back.layer1[0].bn1) is nn.SyncBatchNorm
    assert_state_equal(back, fused)
    model.eval()
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x32), model(x32), rtol=1e-5, atol=1e-5)


def test_convert_sync_batchnorm_refuses_a_folded_bn_without_its_conv():
    fused, _ = fuse(small_basic_resnet())
    with pytest.raises(ValueError, match="FoldedBatchNorm2d .* together with its FusedConv2d"):
        fnn.convert_sync_batchnorm(fused.bn1)

    class MyBN(nn.BatchNorm2d):
        pass

    with pytest.raises(ValueError, match="MyBN is a BatchNorm2d subclass"):
        fnn.convert_sync_batchnorm(nn.Sequential(MyBN(4)))


def test_hooks_are_carried_to_fused_blocks_and_back(x32):
    """Hooks registered on a block that fuse() replaces run on the fused block (same values), the
    user's handles still remove them, the report names them, and unfuse gives them back."""
    torch.manual_seed(0)
    model = randomize_bn(small_basic_resnet()).eval()
    seen = {"pre": 0, "fwd": [], "relu": [], "conv": []}

    def pre(mod, inp):
        seen["pre"] += 1

    def fwd(mod, inp, out):
        seen["fwd"].append(out.detach().clone())

    h_pre = model.layer2[0].register_forward_pre_hook(pre)
    h_fwd = model.layer2[0].register_forward_hook(fwd)
    model.relu.register_forward_hook(lambda m, i, o: seen["relu"].append(o.detach().clone()))
    model.conv1.register_forward_hook(lambda m, i, o: seen["conv"].append(o.shape))
    with torch.no_grad():
        model(x32)
    want_block, want_relu = seen["fwd"][0], seen["relu"][0]

    fused, report = fuse(model, inplace=True)
    assert "hooks carried over to the fused block (1 forward-pre, 1 forward)" in report["layer2.0"].reason
    stem = report["conv1+bn1+relu"].reason
    assert "hooks on relu (1 forward) carried over to its FoldedReLU" in stem
    assert "hooks on conv1 (1 forward) now see the fused conv+BN+ReLU output" in stem
    assert "hook" not in report["layer1.0"].reason
    assert isinstance(fused.layer2[0], fnn.BasicBlock)
    with torch.no_grad():
        fused(x32)
    assert seen["pre"] == 2 and len(seen["fwd"]) == 2 and len(seen["relu"]) == 2
    torch.testing.assert_close(seen["fwd"][1], want_block, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["relu"][1], want_relu, rtol=1e-4, atol=1e-4)

    h_pre.remove()  # the handle made before fuse() removes the hook from the fused block
    with torch.no_grad():
        fused(x32)
    assert seen["pre"] == 2 and len(seen["fwd"]) == 3

    back = unfuse(fused, inplace=True)
    assert type(back.layer2[0]) is tv.BasicBlock and type(back.relu) is nn.ReLU
    with torch.no_grad():
        back(x32)
    assert seen["pre"] == 2 and len(seen["fwd"]) == 4 and len(seen["relu"]) == 4
    h_fwd.remove()
    with torch.no_grad():
        back(x32)
    assert len(seen["fwd"]) == 4


# ----------------------------------------------------------------------------- stages


@pytest.mark.skipif(not compiled_ops_available(), reason="eval plans run the C++ ops")
def test_stages_become_stage_and_write_block_ends_in_place(x48):
    from conftest import OpRecorder

    torch.manual_seed(0)
    model = randomize_bn(tv.resnet50(num_classes=10)).eval()
    fused, _ = fuse(model, backend="cpu")
    assert [type(getattr(fused, f"layer{i}")) for i in range(1, 5)] == [fnn.Stage] * 4
    assert type(model.layer1) is nn.Sequential  # fuse copied
    assert list(fused.state_dict()) == list(model.state_dict())
    x = x48.contiguous(memory_format=CL)
    with torch.no_grad():
        fused(x)  # builds the plans
        with OpRecorder() as rec:
            y = fused(x)
        expected = model(x)
    # 4 projection blocks (their own shortcut) + 12 identity blocks after each stage's first
    assert rec.ops.count("fused_resnet.conv_bn_act_residual_") == 16
    assert_close_rel(y, expected, 2e-5, "eval output")
    back = unfuse(fused)
    assert [type(getattr(back, f"layer{i}")) for i in range(1, 5)] == [nn.Sequential] * 4
    assert module_types(back) == module_types(model)


def test_a_sequential_that_is_not_all_blocks_stays_sequential():
    model = nn.Sequential(tv.BasicBlock(8, 8), nn.ReLU(), tv.BasicBlock(8, 8))
    fused, report = fuse(model)
    assert report.counts == {"fused": 2, "skipped": 0}
    assert type(fused) is nn.Sequential
    single = nn.Sequential(tv.BasicBlock(8, 8))
    assert type(fuse(single).model) is nn.Sequential  # one block: nothing to hand on
