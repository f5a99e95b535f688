"""Backend choice: explicit argument, FUSED_RESNET_BACKEND, auto, fallbacks and their reasons."""

from __future__ import annotations

import warnings

import pytest
from conftest import ConvCase, conv_inputs, requires_c

from fused_resnet import _ext, backends
from fused_resnet import functional as FF


def _call(backend=None):
    x, w, s, b, _ = conv_inputs(ConvCase(1, 3, 4, 4, 2))
    return FF.conv_bn_act(x, w, s, b, padding=1, backend=backend)


def test_explicit_torch_backend_is_recorded():
    _call("torch")
    d = backends.last_decision("conv_bn_act")
    assert (d.backend, d.requested, d.source) == ("torch", "torch", "argument")


@requires_c
def test_auto_prefers_compiled_cpu_kernels():
    _call()
    d = backends.last_decision("conv_bn_act")
    assert d.backend == "cpu" and d.requested == "auto" and "auto" in d.reason


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "torch")
    _call()
    d = backends.last_decision("conv_bn_act")
    assert (d.backend, d.source) == ("torch", "FUSED_RESNET_BACKEND")
    _call("auto")  # the argument wins over the variable
    assert backends.last_decision("conv_bn_act").source == "argument"


def test_unknown_backend_names_the_argument(monkeypatch):
    with pytest.raises(ValueError, match=r"backend: expected one of torch, cpu, cuda, triton or 'auto', got 'cudnn'"):
        _call("cudnn")
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSED_RESNET_BACKEND"):
        _call()


def test_unusable_backend_falls_back_and_says_why():
    backends._warned.clear()
    with pytest.warns(backends.FallbackWarning, match="cuda: the cuda backend runs CUDA tensors"):
        _call("cuda")
    d = backends.last_decision("conv_bn_act")
    assert d.backend == ("cpu" if _ext.available() else "torch")
    assert d.requested == "cuda" and "fell back" in d.reason
    with warnings.catch_warnings():  # said once per (op, backend, reason), not on every call
        warnings.simplefilter("error")
        _call("cuda")


def test_triton_on_cpu_tensors_without_the_interpreter_falls_back():
    """Without TRITON_INTERPRET=1 (this process) Triton cannot run CPU tensors: a warned fallback."""
    if _interpreted():
        pytest.skip("TRITON_INTERPRET is set in this process: Triton runs CPU tensors")
    backends._warned.clear()
    why = "triton: .*(CPU tensors when TRITON_INTERPRET=1|triton does not import)"
    with pytest.warns(backends.FallbackWarning, match=why):
        _call("triton")
    d = backends.last_decision("conv_bn_act")
    assert d.requested == "triton" and d.backend == ("cpu" if _ext.available() else "torch")


def _interpreted():
    from fused_resnet import triton as fr_triton

    return fr_triton._env_interpret()


def test_trace_collects_every_decision():
    x, w, s, b, _ = conv_inputs(ConvCase(2, 3, 4, 4, 5))
    with backends.trace() as log:
        z, st = FF.conv_stats(x, w, padding=1, backend="torch")
        sc, sh, _, _ = FF.bn_finalize(st, z.numel() // 5, backend="torch")
        FF.bn_add_act(z, sc, sh, backend="torch")
    assert [d.op for d in log] == ["conv_stats", "bn_finalize", "bn_add_act"]
    assert all(d.backend == "torch" for d in log)


def test_usable_backends_lists_every_backend():
    table = backends.usable_backends("cpu")
    assert set(table) == set(backends.BACKENDS)
    assert table["torch"] is None
    assert (table["cpu"] is None) == _ext.available()
