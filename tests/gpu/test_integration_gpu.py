"""Issue #8's GPU integration checks: property-based tests of the CUDA and Triton backends against
the float64 reference, CUDA graph capture and replay of a whole fused model (ResNet-18), and autocast on
fused models against torchvision under the same autocast. Skips without CUDA.

Never run on a GPU yet (none was lent while it was written); the checkers it uses
(``gpu_common.check_conv_bn_act`` / ``check_conv_stats``) were smoke-tested on CPU tensors.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torchvision
from conftest import randomize_norms as shared_randomize_norms
from gpu_common import (  # noqa: F401  (no_tf32_seeded: autouse fixture, TF32 off, fixed seed)
    CL,
    DEV,
    Conv,
    capture,
    check_conv_bn_act,
    check_conv_stats,
    conv_inputs,
    no_tf32_seeded,
    rand,
    vec,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    from fused_resnet import backends, models
    from fused_resnet import functional as FR
except Exception:  # pragma: no cover - keeps the module collectable while the package changes
    backends = None

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or backends is None, reason="needs CUDA")

# Per (backend, dtype); every new shape costs Triton an autotuning run, so the default is small.
EXAMPLES = int(os.environ.get("FUSED_RESNET_GPU_FUZZ_EXAMPLES", "12"))
GPU_BACKENDS = ["cuda", "triton"]


def _skip_unusable(backend, dtype=torch.float32):
    reason = backends.unsupported_reason(backend, torch.device(DEV), dtype, "conv_bn_act")
    if reason:
        pytest.skip(f"{backend}: {reason}")


def _ran(log, op, backend):
    ran = [d.backend for d in log if d.op == op]
    assert ran and all(b == backend for b in ran), f"{op}: expected backend {backend}, ran {ran} (silent fallback?)"


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2, 4, 32]))
    cg = draw(st.integers(1, 24))
    kg = draw(st.integers(1, 24))
    r = draw(st.sampled_from([1, 3, 5, 7]))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 3))
    eff = dilation * (r - 1) + 1
    h = draw(st.integers(max(1, eff - 2 * padding), 40))
    w = draw(st.integers(max(1, eff - 2 * padding), 40))
    return Conv(draw(st.integers(1, 5)), cg * groups, h, w, kg * groups, r, draw(st.integers(1, 2)), padding,
                dilation, groups)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=conv_configs(), residual=st.booleans(), relu=st.booleans(), prologue=st.booleans(),
       offset=st.sampled_from([0.0, 0.0, 8.0]))
def test_fuzz_conv_ops(backend, dtype, case, residual, relu, prologue, offset):
    """conv_bn_act and conv_stats at random valid configs, by the 2x rule, on the backend asked for."""
    _skip_unusable(backend, dtype)
    x, w = conv_inputs(case, dtype)
    if offset:  # |mean| >> std for the statistics
        x = (x.to(torch.float32) + offset).to(dtype).contiguous(memory_format=CL)
    scale, shift = vec(case.k, dtype, positive=True), vec(case.k, dtype)
    res = rand(case.n, case.k, *case.out_hw(), dtype=dtype) if residual else None
    with backends.trace() as log:
        y = FR.conv_bn_act(x, w, scale, shift, res, *case.args, relu, backend=backend)
    _ran(log, "conv_bn_act", backend)
    check_conv_bn_act(y, x, w, scale, shift, res, case, dtype, relu, f"{backend} conv_bn_act {case}")
    in_scale = vec(case.c, dtype, positive=True) if prologue else None
    in_shift = vec(case.c, dtype) if prologue else None
    with backends.trace() as log:
        z, stats = FR.conv_stats(x, w, in_scale, in_shift, prologue, *case.args, backend=backend)
    _ran(log, "conv_stats", backend)
    check_conv_stats(z, stats, x, w, in_scale, in_shift, prologue, case, dtype, f"{backend} conv_stats {case}")


_randomize_norms = functools.partial(shared_randomize_norms, seed=3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_fused_model_eval(backend, dtype):
    """A whole fused model (ResNet-18, eval; small so Triton's first-call tuning stays short)
    captured once; replays on new inputs equal eager calls of the same model."""
    _skip_unusable(backend, dtype)
    model = models.resnet18(backend=backend)
    _randomize_norms(model)
    model = model.to(DEV, dtype).to(memory_format=CL).eval()
    x = torch.randn(4, 3, 64, 64, device=DEV, dtype=dtype).contiguous(memory_format=CL)
    with torch.no_grad():
        graph, y = capture(lambda: model(x), warmup=2)  # folds cached and Triton tuned before the capture
        for seed in (1, 2):
            torch.manual_seed(seed)
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            expected = model(x)
            assert y.abs().max() > 0
            torch.testing.assert_close(y, expected, msg=f"{backend} {dtype}: graph replay != eager")


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_fused_resnet50_like_torchvision(mode, dtype):
    """Under torch.autocast the fused model gives torchvision's output dtype, and its error
    against float32 (TF32 off) is at most 2x torchvision's own autocast error plus a floor."""
    tv = torchvision.models.resnet50()
    _randomize_norms(tv)
    tv = tv.to(DEV).to(memory_format=CL)
    fused = models.resnet50(backend="cuda").to(DEV).to(memory_format=CL)
    fused.load_state_dict(tv.state_dict(), strict=True)
    tv.train(mode == "train")
    fused.train(mode == "train")
    x = torch.randn(4, 3, 224, 224, device=DEV).contiguous(memory_format=CL)
    with torch.no_grad():
        ref = tv(x)  # float32 reference (in train mode outputs use batch statistics: running stats don't matter)
        with torch.autocast("cuda", dtype=dtype):
            y_tv = tv(x)
            y_f = fused(x)
    assert y_f.dtype == y_tv.dtype, f"fused {y_f.dtype} vs torchvision {y_tv.dtype} under autocast {dtype}"
    mag = max(ref.abs().max().item(), 1.0)
    own = (y_tv.float() - ref).abs().max().item()
    err = (y_f.float() - ref).abs().max().item()
    assert err <= 2 * own + 1e-3 * mag, f"{mode} {dtype}: fused error {err:.3e} > 2x torchvision's {own:.3e}"
