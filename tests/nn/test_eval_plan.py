"""Eval plans (fused_resnet.nn._fusion.EvalPlan): after one ordinary no-grad eval forward, fused
modules call conv_bn_act directly. These tests check that a plan is used when it may be, never
when it may not, that it gives the ordinary path's exact result, and that every kind of state change
rebuilds it (compared with torchvision's unfused modules and with FUSED_RESNET_FAST_EVAL=0)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torchvision
from conftest import OpRecorder, assert_matches, randomize_norms, run_in_threads
from torch import nn

import fused_resnet
import fused_resnet.functional as F
from fused_resnet import backends
from fused_resnet import nn as fnn
from fused_resnet.models import resnet18, resnet50
from fused_resnet.nn import _fusion

pytestmark = pytest.mark.skipif(not fused_resnet.functional.compiled_ops_available(),
                                reason="plans run the C++ ops (_C not built)")


class CountFunctional:
    """Counts calls of fused_resnet.functional.conv_bn_act made by the unit engine (the ordinary
    path); a forward through a plan makes none."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = F.conv_bn_act

        def counting(*a, **k):
            self.n += 1
            return orig(*a, **k)

        monkeypatch.setattr(_fusion.F, "conv_bn_act", counting)

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def _tv_bottleneck(inplanes=64, planes=32, stride=2, seed=1):
    ds = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
    blk = torchvision.models.resnet.Bottleneck(inplanes, planes, stride, ds)
    randomize_norms(blk, seed)
    return blk.eval()


def _x(*shape):
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def _twice(module, x, calls: CountFunctional):
    """Two no-grad forwards: the first must take the ordinary path, the second the plan."""
    with torch.no_grad():
        first = module(x)
        assert calls.take() > 0
        second = module(x)
        assert calls.take() == 0
    return first, second


def _ordinary(module, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv(_fusion.FAST_EVAL_ENV, "0")
        with torch.no_grad():
            return module(x)


def test_plan_is_used_and_matches_the_ordinary_path_bitwise(monkeypatch):
    # Bitwise with the block end written out of place, as the ordinary path writes it; writing into
    # the dead projection output (oneDNN's sum post-op) rounds differently: see the next test.
    monkeypatch.setenv(_fusion.INPLACE_ENV, "0")
    tv = _tv_bottleneck()
    fused = fnn.Bottleneck.from_module(copy.deepcopy(tv))
    calls = CountFunctional(monkeypatch)
    x = _x(2, 64, 15, 13)
    with torch.no_grad():
        first = fused(x)
        assert calls.take() == 4  # 3 units + projection, ordinary path; the plan is built after it
        second = fused(x)
        assert calls.take() == 0  # plan: no functional call
        expected = tv(x)
    assert torch.equal(first, second)
    assert torch.equal(second, _ordinary(fused, x, monkeypatch))
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-4)
    assert second.is_contiguous(memory_format=torch.channels_last)
    assert backends.last_decision("conv_bn_act").backend == "cpu"


def test_no_plan_when_grad_autocast_trace_or_switch(monkeypatch):
    fused = fnn.Bottleneck.from_module(_tv_bottleneck())
    calls = CountFunctional(monkeypatch)
    x = _x(1, 64, 8, 8)
    with torch.no_grad():
        fused(x)
    calls.take()
    fused(x)  # grad enabled (parameters require grad): ordinary path, autograd recorded
    assert calls.take() == 4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
    assert calls.take() == 4 and y.dtype == torch.bfloat16
    with torch.no_grad(), backends.trace() as log:
        fused(x)
    assert calls.take() == 4 and len(log) == 4
    monkeypatch.setenv(_fusion.FAST_EVAL_ENV, "0")
    with torch.no_grad():
        fused(x)
    assert calls.take() == 4
    monkeypatch.setenv(_fusion.FAST_EVAL_ENV, "1")
    with torch.inference_mode():
        fused(x)  # the no_grad plan's key says "not inference mode": rebuilt
        assert calls.take() == 4
        fused(x)
        assert calls.take() == 0


@pytest.mark.parametrize("change", ["running_mean", "bn_weight", "conv_weight", "data_swap", "train_eval",
                                    "replace_bn", "backend", "env_backend", "shape", "double", "eps", "stride"])
def test_state_changes_rebuild_the_plan(change, monkeypatch):
    tv = _tv_bottleneck()
    fused = fnn.Bottleneck.from_module(copy.deepcopy(tv))
    calls = CountFunctional(monkeypatch)
    x = _x(2, 64, 12, 12)
    with torch.no_grad():
        fused(x)
        fused(x)
    assert calls.take() == 4
    with torch.no_grad():
        if change == "running_mean":
            for m in (tv, fused):
                m.bn2.running_mean.add_(0.7)
        elif change == "bn_weight":
            for m in (tv, fused):
                m.bn3.weight.mul_(-1.5)
        elif change == "conv_weight":
            for m in (tv, fused):
                m.conv1.weight.mul_(2.0)
        elif change == "data_swap":
            new = torch.randn_like(tv.downsample[1].running_var).abs() + 0.1
            tv.downsample[1].running_var.data = new.clone()
            fused.downsample[1].running_var.data = new.clone()
        elif change == "train_eval":
            for m in (tv, fused):
                m.train()
                m(x)  # batch statistics: updates the running statistics of both
                m.eval()
        elif change == "replace_bn":
            new = nn.BatchNorm2d(32)
            randomize_norms(new, 7)
            tv.bn1, fused.bn1 = copy.deepcopy(new).eval(), copy.deepcopy(new).eval()
        elif change == "backend":
            fused.backend = "torch"  # the reference backend takes no plan
        elif change == "env_backend":
            monkeypatch.setenv("FUSED_RESNET_BACKEND", "torch")
        elif change == "shape":
            x = _x(3, 64, 9, 11)
        elif change == "double":
            tv.double()
            fused.double()
            x = x.double()
        elif change == "eps":
            for m in (tv, fused):
                m.bn2.eps = 0.5
        elif change == "stride":
            for m in (tv, fused):
                m.conv2.stride = (1, 1)
                m.downsample[0].stride = (1, 1)
        y = fused(x)
        assert calls.take() == 4, "the changed state must take the ordinary path"
        again = fused(x)
        expected = tv(x)
    takes_plan = change not in ("backend", "env_backend")
    assert calls.take() == (0 if takes_plan else 4)
    assert torch.equal(y, again)
    tol = 1e-10 if x.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(again, expected, rtol=tol, atol=tol)


def test_copies_and_pickles_start_without_a_plan(monkeypatch):
    fused = fnn.Bottleneck.from_module(_tv_bottleneck())
    x = _x(1, 64, 8, 8)
    with torch.no_grad():
        fused(x)
        fused(x)
    assert fused._plan_slot.plan is not None
    for other in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert other._plan_slot.plan is None
        with torch.no_grad():
            other.bn1.running_mean.add_(1.0)  # independent tensors: must not affect the original
            assert not torch.equal(other(x), fused(x))


def test_bad_input_after_a_plan_still_raises_clearly():
    fused = fnn.Bottleneck.from_module(_tv_bottleneck())
    with torch.no_grad():
        fused(_x(1, 64, 8, 8))
        fused(_x(1, 64, 8, 8))
        with pytest.raises(ValueError, match="expected 64 input channels"):
            fused(_x(1, 32, 8, 8))
        with pytest.raises(ValueError, match="4-D"):
            fused(torch.randn(64, 8, 8))
        with pytest.raises(TypeError, match="dtype"):
            fused(_x(1, 64, 8, 8).half())


def test_downsample_with_prefix_and_unsplittable_downsample(monkeypatch):
    # timm-style "avg_down": AvgPool then 1x1 conv + BN; and a downsample that is not conv + BN.
    blk = torchvision.models.resnet.Bottleneck(
        64, 32, 2, nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True), nn.Conv2d(64, 128, 1, bias=False),
                                 nn.BatchNorm2d(128)))
    randomize_norms(blk, 3)
    blk.conv2.stride = (2, 2)
    blk.eval()
    other = torchvision.models.resnet.Bottleneck(64, 32, 2, nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(64, 128, 1)))
    randomize_norms(other, 4)
    other.eval()
    calls = CountFunctional(monkeypatch)
    for tv, n in ((blk, 4), (other, 3)):
        fused = fnn.Bottleneck.from_module(copy.deepcopy(tv))
        x = _x(2, 64, 10, 10)
        with torch.no_grad():
            fused(x)
            assert calls.take() == n
            y = fused(x)
            assert calls.take() == 0
            torch.testing.assert_close(y, tv(x), rtol=1e-4, atol=1e-4)


def test_plain_block_and_basic_block(monkeypatch):
    calls = CountFunctional(monkeypatch)
    for cls in (fnn.BasicBlock, fnn.PlainBasicBlock):
        blk = cls(32, 32)
        randomize_norms(blk, 5)
        blk.eval()
        x = _x(2, 32, 9, 9)
        first, second = _twice(blk, x, calls)
        assert torch.equal(first, second)
        assert torch.equal(second, _ordinary(blk, x, monkeypatch))


def test_conv_bn_act_module_and_frozen_bn(monkeypatch):
    from torchvision.ops import FrozenBatchNorm2d

    calls = CountFunctional(monkeypatch)
    for relu in (True, False):
        m = fnn.ConvBNAct(16, 24, 3, stride=2, relu=relu)
        randomize_norms(m, 6)
        m.eval()
        x = _x(2, 16, 11, 7)
        first, second = _twice(m, x, calls)
        with torch.no_grad():
            m.relu = not relu  # the flag is part of the key
            flipped = m(x)
            assert calls.take() == 1
            expected = m.bn(m.conv(x))
        assert torch.equal(first, second)
        torch.testing.assert_close(flipped, expected.relu() if not relu else expected, rtol=1e-4, atol=1e-4)
    tv = _tv_bottleneck()
    for name in ("bn1", "bn2", "bn3"):
        bn = getattr(tv, name)
        frozen = FrozenBatchNorm2d(bn.num_features, bn.eps)
        frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
        setattr(tv, name, frozen)
    fused = fnn.Bottleneck.from_module(copy.deepcopy(tv)).train()  # frozen BN folds even in train()
    x = _x(2, 64, 8, 8)
    with torch.no_grad():
        fused.downsample.eval()
        fused(x)
        calls.take()
        y = fused(x)
        assert calls.take() == 0
        torch.testing.assert_close(y, tv.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", [resnet18, resnet50])
def test_models_use_plans_and_match_torchvision(build, monkeypatch):
    tv = getattr(torchvision.models, build.__name__)()
    randomize_norms(tv, 11)
    tv.eval()
    fused = build()
    fused.load_state_dict(tv.state_dict())
    fused.eval()
    calls = CountFunctional(monkeypatch)
    x = torch.randn(2, 3, 40, 32)  # NCHW: converted at the entry
    with torch.no_grad():
        fused(x)
        assert calls.take() > 0
        y = fused(x)
        assert calls.take() == 0
        expected = tv(x)
        fused.layer3[0].bn2.running_var.mul_(3.0)
        tv.layer3[0].bn2.running_var.mul_(3.0)
        changed = fused(x)
        blk = fused.layer3[0]  # only this block is rebuilt: its units plus its projection
        assert calls.take() == len(blk._units) + 1
        expected_changed = tv(x)
    torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(changed, expected_changed, rtol=1e-3, atol=1e-3)
    assert not torch.equal(changed, y)


def test_plans_under_threads(monkeypatch):
    fused = fnn.Bottleneck.from_module(_tv_bottleneck())
    inputs = [_x(1, 64, 10, 10) for _ in range(4)]
    with torch.no_grad():
        expected = [_ordinary(fused, x, monkeypatch) for x in inputs]

    def work(i):
        with torch.no_grad():
            for _ in range(5):
                x = inputs[i % 4]
                assert torch.equal(fused(x), expected[i % 4])

    errors = run_in_threads(work, 4)
    assert not errors, errors


@pytest.mark.parametrize("fast", ["1", "0"])
def test_train_eval_alternation_refolds(fast, monkeypatch):
    """Train, evaluate, train more, evaluate again (the usual epoch loop): the second evaluation must
    use the running statistics the second training phase left, with and without plans. (Before the
    ops bumped the buffers' versions, the fold cache kept the first evaluation's folds.)"""
    monkeypatch.setenv(_fusion.FAST_EVAL_ENV, fast)
    tv = torchvision.models.resnet18()
    randomize_norms(tv, 12)
    fused = resnet18()
    fused.load_state_dict(tv.state_dict())
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        for m in (tv, fused):
            m.train()
            with torch.no_grad():
                m(x * 1.5 + 0.3)  # batch statistics: both move their running statistics the same way
            m.eval()
        with torch.no_grad():
            y, expected = fused(x), tv(x)
            y2 = fused(x)
        torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-4)  # the CPU plan's stem runs in oneDNN


def _stem_models(seed=13):
    tv = torchvision.models.resnet50()
    randomize_norms(tv, seed)
    fused = resnet50()
    fused.load_state_dict(tv.state_dict())
    return tv.eval(), fused.eval()


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 33, 47), (3, 3, 18, 21)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_onednn_stem_matches_the_ordinary_stem(shape, ceil_mode, monkeypatch):
    """conv1 + bn1 + relu + maxpool in oneDNN's blocked layout (ReLU after the pool) against the
    ordinary path and torchvision, at odd sizes and with ceil_mode (pool windows over the edge)."""
    from fused_resnet.nn._onednn_stem import OneDNNStem

    tv, fused = _stem_models()
    for m in (tv, fused):
        m.maxpool.ceil_mode = ceil_mode
    x = torch.randn(*shape) * 2 - 0.5
    with torch.no_grad():
        ordinary = fused.maxpool(fused._fused_entry(x))  # no pool given: no oneDNN stem
        fused._fused_entry(x, fused.maxpool)  # builds the plan
        plan = fused._stem_plan.plan
        assert isinstance(plan.stem, OneDNNStem)
        y = fused._fused_entry(x, fused.maxpool)
        expected = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == expected.shape
    torch.testing.assert_close(y, ordinary, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert (y == 0).any() and (y > 0).any()  # the ReLU did something on both sides


def test_onednn_stem_only_where_it_applies(monkeypatch):
    tv, fused = _stem_models()
    x = torch.randn(1, 3, 32, 32)

    def stem_after_two_calls():
        with torch.no_grad():
            fused(x)
            y = fused(x)
        plan = fused._stem_plan.plan
        return (plan is not None and plan.stem is not None), y

    used, y = stem_after_two_calls()
    assert used
    with torch.no_grad():
        torch.testing.assert_close(y, tv(x), rtol=1e-3, atol=1e-3)
    monkeypatch.setenv("FUSED_RESNET_CPU_ONEDNN", "0")
    fused._stem_plan.plan = None
    assert not stem_after_two_calls()[0]
    monkeypatch.delenv("FUSED_RESNET_CPU_ONEDNN")
    fused.maxpool = nn.AvgPool2d(3, 2, 1)  # another pool: plain conv_bn_act + that pool
    tv.maxpool = nn.AvgPool2d(3, 2, 1)
    used, y = stem_after_two_calls()
    assert not used
    with torch.no_grad():
        torch.testing.assert_close(y, tv(x), rtol=1e-3, atol=1e-3)
    fused.double()
    tv.double()
    fused.maxpool = tv.maxpool = nn.MaxPool2d(3, 2, 1)
    x = x.double()
    used, y = stem_after_two_calls()
    assert not used  # float64: conv_bn_act
    with torch.no_grad():
        torch.testing.assert_close(y, tv(x), rtol=1e-9, atol=1e-9)


def test_unfusable_modules_under_no_grad(monkeypatch):
    """Plan keys are computed before a module knows whether it fuses: blocks and ConvBNAct with a
    GroupNorm or an Identity norm must still run (unfused, with their warning) under no_grad."""
    blk = torchvision.models.resnet.BasicBlock(16, 16, norm_layer=lambda c: nn.GroupNorm(4, c)).eval()
    fused = fnn.BasicBlock(16, 16, norm_layer=lambda c: nn.GroupNorm(4, c)).eval()
    fused.load_state_dict(blk.state_dict())
    cba = fnn.ConvBNAct(16, 8, 3, norm_layer=lambda c: nn.Identity()).eval()
    x = _x(2, 16, 6, 6)
    with pytest.warns(backends.FallbackWarning), torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(fused(x), blk(x))
            torch.testing.assert_close(cba(x), torch.relu(cba.conv(x)))
    assert fused._plan_slot.plan is None and cba._plan_slot.plan is None


# ----------------------------------------------------------------------------- dead residuals
# (fused_resnet.nn._fusion, "Writing into a dead residual")

INTO = "fused_resnet.conv_bn_act_residual_"


def _plan_forward_ops(module, x):
    """The ops of a plan forward (the first forward builds the plans) and its output."""
    with torch.no_grad():
        module(x)
        with OpRecorder() as rec:
            y = module(x)
    return rec.ops, y


def test_projection_block_end_writes_into_its_own_shortcut(monkeypatch):
    tv = _tv_bottleneck()
    fused = fnn.Bottleneck.from_module(copy.deepcopy(tv))
    x = _x(2, 64, 15, 13)
    x_before = x.clone()
    ops, y = _plan_forward_ops(fused, x)
    assert ops.count(INTO) == 1 and ops.count("fused_resnet.conv_bn_act") == 3
    assert torch.equal(x, x_before), "the block input is not the projection's shortcut: never written"
    out_of_place = _ordinary(fused, x, monkeypatch)
    assert_matches(y, out_of_place.double(), torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(y, tv(x), rtol=1e-4, atol=1e-4)
    monkeypatch.setenv(_fusion.INPLACE_ENV, "0")
    ops, y_off = _plan_forward_ops(fused, x)
    assert ops.count(INTO) == 0
    assert torch.equal(y_off, out_of_place)


def test_identity_block_called_by_the_user_never_writes_its_input():
    tv = torchvision.models.resnet.Bottleneck(64, 16)
    randomize_norms(tv, 3)
    fused = fnn.Bottleneck.from_module(copy.deepcopy(tv.eval()))
    x = _x(2, 64, 9, 9)
    x_before = x.clone()
    ops, y = _plan_forward_ops(fused, x)
    assert ops.count(INTO) == 0
    assert torch.equal(x, x_before)
    with torch.no_grad():
        torch.testing.assert_close(y, tv(x), rtol=1e-4, atol=1e-4)


def _model_pair(build=resnet50, seed=11):
    tv = getattr(torchvision.models, build.__name__)()
    randomize_norms(tv, seed)
    fused = build()
    fused.load_state_dict(tv.state_dict())
    return tv.eval(), fused.eval()


def test_model_stages_write_each_block_end_into_the_previous_output(monkeypatch):
    tv, fused = _model_pair()
    x = _x(2, 3, 40, 32)
    x_before = x.clone()
    ops, y = _plan_forward_ops(fused, x)
    # ResNet-50: 4 projection blocks (own shortcut) + 12 identity blocks after a stage's first.
    assert ops.count(INTO) == 16
    assert torch.equal(x, x_before)
    with torch.no_grad():
        expected = tv(x)
    torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-3)
    monkeypatch.setenv(_fusion.INPLACE_ENV, "0")
    ops, y_off = _plan_forward_ops(fused, x)
    assert ops.count(INTO) == 0
    assert_matches(y, y_off.double(), torch.float32)


@pytest.mark.parametrize("where", ["block", "stage", "global"])
def test_a_hook_keeps_every_tensor_it_can_see_intact(where):
    """A hook may keep a block's input or output; then nothing it can see may be overwritten."""
    tv, fused = _model_pair()
    seen = []

    def keep(module, args, output):
        seen.append((output, output.clone()))

    target = {"block": fused.layer1[0], "stage": fused.layer2}.get(where)
    handle = (target.register_forward_hook(keep) if target is not None
              else nn.modules.module.register_module_forward_hook(
                  lambda m, a, o: keep(m, a, o) if isinstance(m, fnn.Bottleneck) else None))
    try:
        ops, y = _plan_forward_ops(fused, _x(2, 3, 40, 32))
    finally:
        handle.remove()
    # A block hook turns it off in that block's stage only; a global hook everywhere (the
    # projections' own temporaries are still written: no hook can see them). A hook on the stage
    # sees only the stage's input and output, which are never written.
    assert ops.count(INTO) == {"block": 14, "stage": 16, "global": 4}[where]
    assert seen
    for kept, copy_at_the_time in seen:
        assert torch.equal(kept, copy_at_the_time)


def test_stage_runner_leaves_subclassed_blocks_and_other_dtypes_alone():
    class MyBlock(fnn.Bottleneck):
        def forward(self, x):
            return super().forward(x) * 1.0

    _, fused = _model_pair()
    fused.layer1[1].__class__ = MyBlock
    ops, _ = _plan_forward_ops(fused, _x(2, 3, 40, 32))
    assert ops.count(INTO) == 14  # layer1's identity blocks run as called
    _, fused = _model_pair()
    fused = fused.to(torch.bfloat16)
    ops, _ = _plan_forward_ops(fused, _x(1, 3, 32, 32).to(torch.bfloat16))
    assert ops.count(INTO) == 0  # out of place + copy would be slower than out of place


def test_cifar_models_use_it_too():
    from fused_resnet.models import cifar_resnet

    fused = cifar_resnet(20, shortcut="B").eval()
    randomize_norms(fused, 5)
    ref = cifar_resnet(20, shortcut="B").eval()
    ref.load_state_dict(fused.state_dict())
    x = _x(2, 3, 16, 16)
    ops, y = _plan_forward_ops(fused, x)
    assert ops.count(INTO) == 2 + 3 * 2  # two projections, two identity blocks after each stage's first
    with torch.no_grad():
        torch.testing.assert_close(y, ref.to(torch.float64)(x.double()).float(), rtol=1e-3, atol=1e-3)
