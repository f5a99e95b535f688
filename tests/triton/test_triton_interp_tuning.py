"""The conv kernel's precision and tuning plumbing under the interpreter: TF32 follows
``torch.backends.cudnn.allow_tf32`` on every call and is part of the tuning key; the GPU-only
candidate pruning leaves CPU (interpreter) launches alone."""

from _interp import require_interpreter

require_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import ConvCase, conv_inputs, spy_triton_launches  # noqa: E402

from fused_resnet.triton import conv, load_ops  # noqa: E402

T = load_ops()


@pytest.fixture
def tf32_flag():
    old = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("allow", [True, False])
def test_float32_precision_follows_allow_tf32(tf32_flag, monkeypatch, allow):
    launched = spy_triton_launches(monkeypatch)
    torch.backends.cudnn.allow_tf32 = allow
    x, w, s, b, _ = conv_inputs(ConvCase(1, 4, 4, 4, 4))
    T.conv_bn_act(x, w, s, b, None, [1, 1], [1, 1], [1, 1], 1, False)
    T.conv_stats(x.half(), w.half(), None, None, False, [1, 1], [1, 1], [1, 1], 1)
    seen = [kw["INPUT_PRECISION"] for k, kw in launched if k is conv.conv_kernel]
    assert seen == ["tf32" if allow else "ieee", "tf32"]  # 16-bit inputs: the setting does not apply


def test_precision_is_a_tuning_key_and_cpu_launches_are_not_pruned():
    assert "INPUT_PRECISION" in conv.conv_kernel.keys
    cfgs = conv.conv_kernel.configs
    assert len(cfgs) == 1  # the interpreter's one small config
    x = torch.empty(2, 4, 4, 4)
    assert conv._prune(cfgs * 2, {"x_ptr": x, "M": 32, "Kg": 4, "Cg": 4, "GROUPS": 1}) == cfgs * 2
