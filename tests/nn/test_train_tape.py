"""Block tapes (fused_resnet.nn._tape): in training, a fused block's ops run below autograd as ONE
autograd node whose backward replays the ops' own formulas. These tests check that the tape is
used when it may be and never when it may not, that it gives the op-by-op path's result
(FUSED_RESNET_FAST_TRAIN=0) bit for bit, and autograd's usual lifetime rules."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import randomize_norms
from torch import nn

import fused_resnet
from fused_resnet import backends
from fused_resnet import nn as fnn
from fused_resnet.models import resnet18
from fused_resnet.nn import _tape

pytestmark = pytest.mark.skipif(not fused_resnet.functional.compiled_ops_available(),
                                reason="tapes run the C++ ops (_C not built)")

CL = torch.channels_last
TAPED = "BlockFunctionBackward"


def _block(kind="bottleneck", dtype=torch.float64, proj=True, seed=3, **kw):
    inplanes, planes, stride = (16, 8, 2) if proj else (32, 8, 1)
    tv_cls, f_cls = ((torchvision.models.resnet.Bottleneck, fnn.Bottleneck) if kind == "bottleneck"
                     else (torchvision.models.resnet.BasicBlock, fnn.BasicBlock))
    if kind == "basic" and not proj:
        inplanes = planes
    ds = None
    if proj:
        ds = nn.Sequential(nn.Conv2d(inplanes, planes * tv_cls.expansion, 1, stride, bias=False),
                           nn.BatchNorm2d(planes * tv_cls.expansion))
    ref = tv_cls(inplanes, planes, stride, ds, **kw)
    randomize_norms(ref, seed)
    blk = f_cls.from_module(ref, backend="cpu").to(dtype).train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, inplanes, 9, 9, generator=g, dtype=dtype).contiguous(memory_format=CL)
    return blk, x


def _step(blk, x, monkeypatch, fast: str, grad_seed=7):
    """One training forward + backward with FUSED_RESNET_FAST_TRAIN=fast on a fresh copy of the
    block's state; returns (output, grad_fn name, x.grad, param grads, buffers)."""
    import copy

    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, fast)
    b = copy.deepcopy(blk)
    xx = x.clone().requires_grad_()
    y = b(xx)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=y.dtype)
    y.backward(g)
    return (y.detach(), type(y.grad_fn).__name__, xx.grad, {k: p.grad for k, p in b.named_parameters()},
            {k: v.clone() for k, v in b.named_buffers()})


def _same(a, b):
    """Bitwise equal results (the tape runs the same kernels and formulas in the same order)."""
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)
    assert a[3].keys() == b[3].keys()
    for k in a[3]:
        assert (a[3][k] is None) == (b[3][k] is None), k
        if a[3][k] is not None:
            torch.testing.assert_close(a[3][k], b[3][k], rtol=0, atol=0, msg=k)
    for k in a[4]:
        torch.testing.assert_close(a[4][k], b[4][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,proj", [("bottleneck", True), ("bottleneck", False), ("basic", True),
                                       ("basic", False)])
def test_tape_equals_op_by_op(kind, proj, dtype, monkeypatch):
    blk, x = _block(kind, dtype, proj)
    taped = _step(blk, x, monkeypatch, "1")
    plain = _step(blk, x, monkeypatch, "0")
    assert taped[1] == TAPED and plain[1] != TAPED
    _same(taped, plain)
    assert all(g is not None for g in taped[3].values())


def test_tape_matches_torchvision_over_steps():
    """Two optimizer steps of a taped Bottleneck against torchvision's (float64)."""
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    ref = torchvision.models.resnet.Bottleneck(16, 8, 2, ds).double().train()
    randomize_norms(ref, 5)
    blk = fnn.Bottleneck(16, 8, 2, nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32)),
                         backend="cpu").double().train()
    blk.load_state_dict(ref.state_dict())
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(blk.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(4, 16, 10, 10, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
        w = torch.randn(4, 32, 5, 5, generator=g, dtype=torch.float64)
        for m, opt in ((ref, opt_r), (blk, opt_f)):
            opt.zero_grad()
            xx = x.clone().requires_grad_()
            y = m(xx)
            (y * w).sum().backward()
            opt.step()
            m.last = (y.detach(), xx.grad, type(y.grad_fn).__name__)
        assert blk.last[2] == TAPED
        torch.testing.assert_close(blk.last[0], ref.last[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(blk.last[1], ref.last[1], rtol=1e-9, atol=1e-9)
    for (k, a), b in zip(blk.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=k)


def test_tape_under_cpu_autocast_equals_op_by_op(monkeypatch):
    """bfloat16 autocast: the tape casts like the ops' autocast rule and casts gradients back."""
    blk, x = _block("bottleneck", torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        taped = _step(blk, x, monkeypatch, "1")
        plain = _step(blk, x, monkeypatch, "0")
    assert taped[1] == TAPED and plain[1] != TAPED
    assert taped[0].dtype == torch.bfloat16 and taped[2].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in taped[3].values())
    _same(taped, plain)


def test_resnet18_step_taped_equals_op_by_op(monkeypatch):
    import copy

    torch.manual_seed(0)
    m = resnet18(num_classes=5).double().train()
    randomize_norms(m, 2)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    out = {}
    for fast in ("1", "0"):
        monkeypatch.setenv(_tape.FAST_TRAIN_ENV, fast)
        mm = copy.deepcopy(m)
        y = mm(x)
        (y * torch.arange(5.0, dtype=torch.float64)).sum().backward()
        out[fast] = (y.detach(), {k: p.grad for k, p in mm.named_parameters()},
                     {k: b.clone() for k, b in mm.named_buffers()}, type(mm.layer2[0](
                         torch.randn(2, 64, 10, 10, dtype=torch.float64)).grad_fn).__name__)
    assert out["1"][3] == TAPED and out["0"][3] != TAPED
    torch.testing.assert_close(out["1"][0], out["0"][0], rtol=0, atol=0)
    for k in out["1"][1]:
        torch.testing.assert_close(out["1"][1][k], out["0"][1][k], rtol=0, atol=0, msg=k)


def test_retain_graph_and_second_backward(monkeypatch):
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    blk, x = _block()
    x = x.requires_grad_()
    y = blk(x)
    assert type(y.grad_fn).__name__ == TAPED
    y.sum().backward(retain_graph=True)
    once = x.grad.clone()
    y.sum().backward()  # the graph was retained: a second backward adds the same gradient
    torch.testing.assert_close(x.grad, 2 * once, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="second time|freed"):
        y.sum().backward()  # ... and now it was freed, as PyTorch's own nodes are


def test_saved_tensors_freed_after_backward(monkeypatch):
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    blk, x = _block()
    y = blk(x.requires_grad_())
    assert len(y.grad_fn.saved_tensors) > 0
    y.sum().backward()
    with pytest.raises(RuntimeError):
        y.grad_fn.saved_tensors  # noqa: B018 - released by autograd, not kept by the tape


def test_only_parameters_or_only_input_needing_grad(monkeypatch):
    blk, x = _block()
    for p in blk.parameters():
        p.requires_grad_(False)
    taped = _step(blk, x, monkeypatch, "1")
    plain = _step(blk, x, monkeypatch, "0")
    assert taped[1] == TAPED
    _same(taped, plain)
    assert all(g is None for g in taped[3].values())
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    for p in blk.parameters():
        p.requires_grad_(True)
    y = blk(x)  # x needs no gradient, the parameters do
    y.sum().backward()
    assert all(p.grad is not None for p in blk.parameters())


def _not_taped(blk, x):
    x = x.clone().requires_grad_()
    y = blk(x)
    return type(y.grad_fn).__name__ != TAPED


@pytest.mark.parametrize("change", ["sync_bn", "conv_bias", "frozen_bn", "ds_prefix", "switch_off",
                                    "no_grad", "trace", "torch_backend"])
def test_not_taped_when_it_may_not_be(change, monkeypatch):
    blk, x = _block(dtype=torch.float32)
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    assert not _not_taped(blk, x)
    if change == "sync_bn":
        blk = fnn.convert_sync_batchnorm(blk)
    elif change == "conv_bias":
        blk.conv2.bias = nn.Parameter(torch.randn(blk.conv2.out_channels))
    elif change == "frozen_bn":
        blk.bn2.eval()
    elif change == "ds_prefix":
        blk.downsample = nn.Sequential(nn.Identity(), *blk.downsample)
    elif change == "switch_off":
        monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "0")
    elif change == "torch_backend":
        blk.backend = "torch"
    if change == "no_grad":
        with torch.no_grad():
            y = blk(x)
        assert y.grad_fn is None
    elif change == "trace":
        with backends.trace() as log:
            assert _not_taped(blk, x)
        assert log
    else:
        assert _not_taped(blk, x)


@pytest.mark.parametrize("case", ["bf16_model", "bn_float64"])
def test_tape_casts_bn_parameters_of_another_dtype(case, monkeypatch):
    """BN parameters in another dtype than the accumulation dtype -- a model cast to bfloat16
    (parameters bfloat16, statistics float32), or one BN kept in float64 -- are cast by the tape,
    their gradients cast back: the op-by-op path's results bit for bit, taped."""
    if case == "bf16_model":
        blk, x = _block("bottleneck", torch.float32, True)
        blk, x = blk.to(torch.bfloat16), x.to(torch.bfloat16)
    else:
        blk, x = _block("bottleneck", torch.float32, True)
        blk.bn3.double()
    taped = _step(blk, x, monkeypatch, "1")
    plain = _step(blk, x, monkeypatch, "0")
    assert taped[1] == TAPED and plain[1] != TAPED
    _same(taped, plain)
    for k, g in taped[3].items():
        assert g.dtype == dict(blk.named_parameters())[k].dtype, k


def test_count_of_one_still_refused(monkeypatch):
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    blk = fnn.BasicBlock(4, 4, backend="cpu").train()
    with pytest.raises(ValueError, match="count"):
        blk(torch.randn(1, 4, 1, 1, requires_grad=True))


def test_tape_records_its_backend_decisions(monkeypatch):
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    blk, x = _block(dtype=torch.float32)
    blk(x.requires_grad_())
    for op in ("conv_stats", "bn_finalize", "bn_add_act"):
        assert backends.last_decision(op).backend == "cpu", op


def test_nothing_needs_grad_in_train_mode(monkeypatch):
    """Grad mode on, but neither input nor parameters need gradients: batch statistics, running
    statistics updated, an output without a graph."""
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    import copy

    blk, x = _block(dtype=torch.float32)
    blk.requires_grad_(False)
    blk2 = copy.deepcopy(blk)
    before = blk.bn1.running_mean.clone()
    y = blk(x)
    assert not y.requires_grad and not torch.equal(blk.bn1.running_mean, before)
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "0")
    torch.testing.assert_close(y, blk2(x), rtol=0, atol=0)
    torch.testing.assert_close(blk.bn1.running_mean, blk2.bn1.running_mean, rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["checkpoint_reentrant", "checkpoint", "save_on_cpu"])
@pytest.mark.parametrize("what", ["block", "stage"])
def test_activation_checkpointing_of_taped_blocks(what, wrap, monkeypatch):
    """torch.utils.checkpoint over a taped block, or a whole stage whose blocks recompute their
    inputs (the links are made and followed inside the checkpointed region; the non-reentrant
    kind replays the saved tensors through saved-tensor hooks, which allow one unpack each), and
    save_on_cpu's hooks: the same gradients as without them and with saved inputs."""
    import copy

    from torch.utils.checkpoint import checkpoint

    def run(mm, xx):
        if wrap == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                return mm(xx)
        return checkpoint(mm, xx, use_reentrant=wrap == "checkpoint_reentrant")

    m, x = _block() if what == "block" else _stage()
    g = torch.randn(3, 32, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = {}
    for ckpt, rc in ((True, "1"), (False, "0")):
        monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
        monkeypatch.setenv(_tape.RECOMPUTE_ENV, rc)
        mm = copy.deepcopy(m)
        xx = x.clone().requires_grad_()
        y = run(mm, xx) if ckpt else mm(xx)
        y.backward(g)
        out[ckpt] = [xx.grad] + [p.grad for p in mm.parameters()]
    for a, b in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- recomputed block inputs (FUSED_RESNET_RECOMPUTE): a taped block whose input is the untouched
# output of another taped block keeps a link to that block's node instead of the input itself.


def _stage(dtype=torch.float64, kind="bottleneck"):
    """A projection block then two identity blocks (one stage), float64 by default."""
    first, x = _block(kind, dtype, proj=True, seed=3)
    rest = [_block(kind, dtype, proj=False, seed=s)[0] for s in (4, 5)]
    return nn.Sequential(first, *rest), x


def _links(y) -> int:
    """How many taped nodes in ``y``'s graph recompute their input."""
    seen, todo, n = set(), [y.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        n += type(node) is _tape._BLOCK_NODE and node.in_slot is not None
        todo += [f for f, _ in node.next_functions]
    return n


def _stage_step(m, x, monkeypatch, recompute: str, between=None, grad_seed=7):
    import copy

    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    monkeypatch.setenv(_tape.RECOMPUTE_ENV, recompute)
    m = copy.deepcopy(m)
    xx = x.clone().requires_grad_()
    y = xx
    for i, blk in enumerate(m):
        y = blk(y)
        if between is not None and i == 0:
            y = between(y)
    links = _links(y)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=y.dtype)
    y.backward(g)
    return y.detach(), "-", xx.grad, {k: p.grad for k, p in m.named_parameters()}, \
        {k: v.clone() for k, v in m.named_buffers()}, links


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recomputed_inputs_equal_saved_inputs(kind, dtype, monkeypatch):
    m, x = _stage(dtype, kind)
    on = _stage_step(m, x, monkeypatch, "1")
    off = _stage_step(m, x, monkeypatch, "0")
    assert on[5] == 2 and off[5] == 0  # the identity blocks recompute; the first block's input is x
    _same(on, off)


def test_resnet_steps_with_recomputed_inputs_equal_saved_inputs(monkeypatch):
    """Whole models: every block recomputes its input (the first one the taped stem's pooled
    output); the step is bit for bit the same as with saved inputs (chains through identity
    shortcuts, stage boundaries included)."""
    import copy

    from fused_resnet.models import resnet50

    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    for ctor, blocks, size in ((resnet18, 8, 40), (resnet50, 16, 36)):  # + the stem (taped, recomputed)
        torch.manual_seed(0)
        m = ctor(num_classes=5).double().train()
        randomize_norms(m, 2)
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        out = {}
        for rc in ("1", "0"):
            monkeypatch.setenv(_tape.RECOMPUTE_ENV, rc)
            mm = copy.deepcopy(m)
            y = mm(x)
            links = _links(y)
            (y * torch.arange(5.0, dtype=torch.float64)).sum().backward()
            out[rc] = (y.detach(), {k: p.grad for k, p in mm.named_parameters()}, links)
        assert out["1"][2] == blocks and out["0"][2] == 0, ctor.__name__  # the first block's input: the stem's
        torch.testing.assert_close(out["1"][0], out["0"][0], rtol=0, atol=0)
        for k in out["1"][1]:
            torch.testing.assert_close(out["1"][1][k], out["0"][1][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("recompute,freed", [("1", True), ("0", False)])
def test_block_output_not_kept_when_recomputed(recompute, freed, monkeypatch):
    """The point of recomputing: once the caller drops a block's output, its memory is gone."""
    from torch.multiprocessing.reductions import StorageWeakRef

    m, x = _stage()
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    monkeypatch.setenv(_tape.RECOMPUTE_ENV, recompute)
    y1 = m[0](x.requires_grad_())
    ref = StorageWeakRef(y1.untyped_storage())
    y2 = m[1](y1)
    del y1
    assert ref.expired() == freed
    y2.sum().backward()  # and the backward still works


@pytest.mark.parametrize("change", ["inplace_no_grad", "inplace_grad", "view", "detach_requires_grad"])
def test_changed_block_output_is_saved_not_recomputed(change, monkeypatch):
    """An output changed (in place, with or without autograd) or handed on as another tensor is
    not the producer's output any more: the next block saves it, and the gradients are the
    saved-input path's."""

    def between(y):
        if change == "inplace_no_grad":
            with torch.no_grad():
                y.mul_(0.5)
            return y
        if change == "inplace_grad":
            return y.mul_(0.5)
        if change == "view":
            return y[:]
        return y.detach().requires_grad_()

    m, x = _stage()
    on = _stage_step(m, x, monkeypatch, "1", between)
    off = _stage_step(m, x, monkeypatch, "0", between)
    assert on[5] == 1  # only the link from the second to the third block is left
    _same(on, off)


def test_recomputed_inputs_retain_graph_and_second_backward(monkeypatch):
    m, x = _stage()
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    monkeypatch.setenv(_tape.RECOMPUTE_ENV, "1")
    x = x.requires_grad_()
    y = m(x)
    assert _links(y) == 2
    y.sum().backward(retain_graph=True)
    once = x.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * once, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="second time|freed"):
        y.sum().backward()


def test_recomputed_input_read_by_two_blocks(monkeypatch):
    """One block's output feeding two later blocks (both recompute it): the same gradients."""
    import copy

    m, x = _stage()
    out = {}
    for rc in ("1", "0"):
        monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
        monkeypatch.setenv(_tape.RECOMPUTE_ENV, rc)
        mm = copy.deepcopy(m)
        xx = x.clone().requires_grad_()
        y1 = mm[0](xx)
        y = mm[1](y1) * 2 + mm[2](y1)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype))
        out[rc] = [xx.grad] + [p.grad for p in mm.parameters()]
    for a, b in zip(out["1"], out["0"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recomputed_inputs_under_cpu_autocast(monkeypatch):
    m, x = _stage(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        on = _stage_step(m, x, monkeypatch, "1")
        off = _stage_step(m, x, monkeypatch, "0")
    assert on[0].dtype == torch.bfloat16 and on[5] == 2
    _same(on, off)


# ---- the taped stem (fused_resnet.models: conv1 -> bn1 -> relu -> maxpool as one node)


def _stem_node(m, x):
    """The grad_fn type of the stem's output (what layer1 receives) and the model's output."""
    seen = []
    h = m.layer1.register_forward_pre_hook(lambda mod, args: seen.append(type(args[0].grad_fn).__name__))
    try:
        y = m(x)
    finally:
        h.remove()
    return seen[0], y


@pytest.mark.parametrize("ctor", ["resnet18", "cifar_resnet20"])
def test_taped_stem_equals_op_by_op(ctor, monkeypatch):
    """Stem taped (its relu(bn(z)) and the pool's indices recomputed in backward) vs op by op:
    outputs, every gradient and the running statistics bit for bit."""
    import copy

    import fused_resnet.models as fm

    torch.manual_seed(0)
    m = getattr(fm, ctor)(num_classes=5).double().train()
    randomize_norms(m, 4)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    out = {}
    for fast in ("1", "0"):
        monkeypatch.setenv(_tape.FAST_TRAIN_ENV, fast)
        mm, xx = copy.deepcopy(m), x.detach().clone().requires_grad_()
        node, y = _stem_node(mm, xx)
        (y * torch.arange(5.0, dtype=torch.float64)).sum().backward()
        out[fast] = (node, y.detach(), xx.grad, {k: p.grad for k, p in mm.named_parameters()},
                     {k: b.clone() for k, b in mm.named_buffers()})
    assert out["1"][0] == TAPED and out["0"][0] != TAPED
    torch.testing.assert_close(out["1"][1], out["0"][1], rtol=0, atol=0)
    torch.testing.assert_close(out["1"][2], out["0"][2], rtol=0, atol=0)
    for i in (3, 4):
        for k in out["1"][i]:
            torch.testing.assert_close(out["1"][i][k], out["0"][i][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("change", ["pool_hook", "pool_backward_hook", "return_indices", "avg_pool",
                                    "global_hook"])
def test_stem_not_taped_when_the_pool_must_run_as_a_module(change, monkeypatch):
    """The tape runs max_pool2d's aten op itself: a pool with hooks (its own, forward or backward,
    or global), indices or another pool type runs as a module, and its hooks see it."""
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    torch.manual_seed(0)
    m = resnet18(num_classes=5).train()
    x = torch.randn(2, 3, 32, 32)
    assert _stem_node(m, x)[0] == TAPED
    calls = []
    handle = None
    if change == "pool_hook":
        m.maxpool.register_forward_hook(lambda *a: calls.append(1))
    elif change == "pool_backward_hook":  # fires in backward, where a taped pool has no module
        m.maxpool.register_full_backward_hook(lambda *a: calls.append(1))
    elif change == "return_indices":
        m.maxpool.return_indices = True
        m.maxpool.register_forward_hook(lambda mod, args, out: (calls.append(1), out[0])[1])
    elif change == "avg_pool":
        m.maxpool = nn.AvgPool2d(3, 2, 1)
        calls.append(1)
    else:
        handle = nn.modules.module.register_module_forward_hook(lambda *a: calls.append(1))
    try:
        node, y = _stem_node(m, x)
    finally:
        if handle is not None:
            handle.remove()
    assert node != TAPED
    y.sum().backward()
    assert calls
