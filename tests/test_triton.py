"""The Triton backend from the main test process.

The kernel tests (``tests/triton/``) need Triton's interpreter, which must be switched on before
triton is imported, so they run here in a subprocess with ``TRITON_INTERPRET=1`` (and skip when
the main process collects them without it). The other tests check how the backend reports itself
where it cannot run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_resnet import backends
from fused_resnet import triton as fr_triton

ROOT = Path(__file__).resolve().parent.parent
ALREADY_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


@pytest.mark.skipif(fr_triton.triton_import_error() is not None, reason="triton does not import")
@pytest.mark.skipif(ALREADY_INTERPRETED, reason="TRITON_INTERPRET is set: tests/triton runs in this process")
def test_interpreter_suite_passes():
    env = dict(os.environ, TRITON_INTERPRET="1", FUSED_RESNET_QUIET="1")
    env.pop("FUSED_RESNET_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "tests/triton", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
           "-W", "ignore::DeprecationWarning"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout[-20000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{out}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], out


def test_cpu_without_interpreter_is_a_clear_fallback():
    if ALREADY_INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process")
    why = backends.unsupported_reason("triton", torch.device("cpu"), torch.float32, "conv_bn_act")
    if fr_triton.triton_import_error() is not None:
        assert "triton does not import" in why
    else:
        assert "TRITON_INTERPRET=1" in why and "CUDA tensors" in why


@pytest.mark.skipif(fr_triton.triton_import_error() is not None, reason="triton does not import")
def test_dtype_reasons_on_cuda():
    cuda = torch.device("cuda")
    assert backends.unsupported_reason("triton", cuda, torch.float16, "conv_stats") is None
    assert backends.unsupported_reason("triton", cuda, torch.bfloat16, "conv_stats") is None
    why = backends.unsupported_reason("triton", cuda, torch.float64, "conv_stats")
    assert "float32/float16/bfloat16" in why and "float64" in why


def test_auto_order_puts_triton_second_on_cuda():
    assert backends._auto_order(torch.device("cuda")) == ("cuda", "triton", "torch")
    assert "triton" not in backends._auto_order(torch.device("cpu"))
