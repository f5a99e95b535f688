"""The Triton backend through the public functional API under the interpreter: backend choice,
gradients of a whole training-mode projection block and of the inference op against the
reference run in float64, running statistics, and torch.compile(fullgraph=True) tracing."""

from _interp import require_interpreter

require_interpreter()

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import ConvCase, assert_matches, conv_inputs, f64, rand, vec  # noqa: E402

from fused_resnet import backends  # noqa: E402
from fused_resnet import functional as FF  # noqa: E402


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _block(backend, x, w1, w2, wr, g1, b1, g2, b2, gr, br, buffers):
    """conv1 -> BN -> [ReLU fused into conv2's prologue] conv2 (3x3 s2) -> BN, projection conv
    (1x1 s2) -> BN, add, ReLU -- the training-mode BasicBlock with downsample, on fused ops."""
    kw = dict(backend=backend)
    z1, s1 = FF.conv_stats(x, w1, padding=1, **kw)
    cnt1 = z1.numel() // z1.shape[1]
    sc1, sh1, _, _ = FF.bn_finalize(s1, cnt1, g1, b1, *buffers[0], **kw)
    z2, s2 = FF.conv_stats(z1, w2, sc1, sh1, True, stride=2, padding=1, **kw)
    cnt2 = z2.numel() // z2.shape[1]
    sc2, sh2, _, _ = FF.bn_finalize(s2, cnt2, g2, b2, *buffers[1], **kw)
    zr, sr = FF.conv_stats(x, wr, stride=2, **kw)
    scr, shr, _, _ = FF.bn_finalize(sr, cnt2, gr, br, *buffers[2], **kw)
    return FF.bn_add_act(z2, sc2, sh2, zr, scr, shr, relu=True, **kw)


def _buffers(k1, k2, dtype=torch.float32):
    return [(torch.zeros(k, dtype=dtype), torch.ones(k, dtype=dtype), torch.tensor(0)) for k in (k1, k2, k2)]


def test_training_block_forward_backward_and_running_stats():
    n, c, h, k = 2, 8, 7, 12
    x = rand(n, c, h, h)
    w1 = rand(c, c, 3, 3, scale=0.3)
    w2 = rand(k, c, 3, 3, scale=0.3)
    wr = rand(k, c, 1, 1, scale=0.3)
    vecs = [vec(c, positive=True), vec(c), vec(k, positive=True), vec(k), vec(k, positive=True), vec(k)]
    leaves = [_leaf(t) for t in (x, w1, w2, wr, *vecs)]
    leaves64 = [_leaf(f64(t)) for t in (x, w1, w2, wr, *vecs)]
    bufs, bufs64 = _buffers(c, k), _buffers(c, k, torch.float64)
    with backends.trace() as log:
        y = _block("triton", *leaves, bufs)
    assert {d.backend for d in log} == {"triton"}, [(d.op, d.backend, d.reason) for d in log]
    y64 = _block("torch", *leaves64, bufs64)
    assert_matches(y, y64, torch.float32, what="block output")
    gy = rand(*y.shape)
    y.backward(gy)
    y64.backward(f64(gy))
    names = ("x", "w1", "w2", "wr", "gamma1", "beta1", "gamma2", "beta2", "gamma_r", "beta_r")
    for name, a, e in zip(names, leaves, leaves64, strict=True):
        assert a.grad is not None, name
        assert_matches(a.grad, e.grad, torch.float32, what=f"grad {name}")
    for (rm, rv, nb), (rm64, rv64, nb64) in zip(bufs, bufs64, strict=True):
        assert_matches(rm, rm64, torch.float32, what="running_mean")
        assert_matches(rv, rv64, torch.float32, what="running_var")
        assert nb.item() == nb64.item() == 1


@pytest.mark.parametrize("case", [ConvCase(2, 6, 6, 6, 10, groups=2), ConvCase(1, 5, 5, 5, 5, 1, 1, padding=0)],
                         ids=str)
def test_conv_bn_act_gradients(case):
    x, w, s, b, r = conv_inputs(case, residual=True)
    leaves = [_leaf(t) for t in (x, w, s, b, r)]
    leaves64 = [_leaf(f64(t)) for t in (x, w, s, b, r)]
    y = FF.conv_bn_act(*leaves, **case.conv_args, backend="triton")
    assert backends.last_decision("conv_bn_act").backend == "triton"
    y64 = FF.conv_bn_act(*leaves64, **case.conv_args, backend="torch")
    assert_matches(y, y64, torch.float32)
    gy = rand(*y.shape)
    y.backward(gy)
    y64.backward(f64(gy))
    for name, a, e in zip(("x", "weight", "scale", "shift", "residual"), leaves, leaves64, strict=True):
        assert_matches(a.grad, e.grad, torch.float32, what=f"grad {name}")


def test_bfloat16_on_the_interpreter_falls_back_and_says_why():
    backends._warned.clear()
    x, w, s, b, _ = conv_inputs(ConvCase(1, 3, 4, 4, 2), dtype=torch.bfloat16)
    with pytest.warns(backends.FallbackWarning, match="interpreter.*bfloat16"):
        FF.conv_bn_act(x, w, s, b, padding=1, backend="triton")
    assert backends.last_decision("conv_bn_act").backend != "triton"


def test_float64_falls_back():
    backends._warned.clear()
    x, w, s, b, _ = conv_inputs(ConvCase(1, 3, 4, 4, 2), dtype=torch.float64)
    with pytest.warns(backends.FallbackWarning, match="float32/float16"):
        FF.conv_bn_act(x, w, s, b, padding=1, backend="triton")


def test_auto_does_not_pick_the_interpreter_on_cpu():
    x, w, s, b, _ = conv_inputs(ConvCase(1, 3, 4, 4, 2))
    FF.conv_bn_act(x, w, s, b, padding=1)
    assert backends.last_decision("conv_bn_act").backend != "triton"


def test_torch_compile_fullgraph_traces_the_triton_ops():
    """fullgraph=True: any graph break in the functional API (validation, backend choice) or at
    the triton ops fails. Dynamo only (backend="eager"): AOT tracing decomposes a triton_op into
    its kernels, which needs real (non-interpreter) Triton kernels -- tests/gpu covers inductor."""
    compile_backend = "eager"
    torch._dynamo.reset()
    case = ConvCase(2, 4, 5, 5, 6)
    x, w, s, b, r = conv_inputs(case, residual=True)

    w2 = rand(6, 6, 1, 1, scale=0.4)

    def step(x, w, s, b, r, w2):
        y = FF.conv_bn_act(x, w, s, b, r, padding=1, backend="triton")
        z, st = FF.conv_stats(y, w2, s, b, True, backend="triton")
        sc, sh, _, _ = FF.bn_finalize(st, z.numel() // 6, backend="triton")
        return FF.bn_add_act(z, sc, sh, y, relu=True, backend="triton")

    eager = step(x, w, s, b, r, w2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(step, fullgraph=True, backend=compile_backend)(x, w, s, b, r, w2)
    torch.testing.assert_close(compiled, eager)
