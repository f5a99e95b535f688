"""Importing without a usable _C: one clear warning, then the reference runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fused_resnet

PKG = Path(fused_resnet.__file__).parent
SNIPPET = (
    "import warnings, torch\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    import fused_resnet\n"
    "    from fused_resnet import functional as F\n"
    "msgs = [str(x.message) for x in w if 'fused_resnet' in str(x.message)]\n"
    "x = torch.randn(1, 2, 3, 3); wt = torch.randn(2, 2, 1, 1); v = torch.ones(2)\n"
    "y = F.conv_bn_act(x, wt, v, v)\n"
    "print(len(msgs)); print(msgs[0] if msgs else ''); print(fused_resnet.backends.last_decision().backend)\n"
)


# An editable install (`pip install -e .`) adds a meta-path finder that resolves `fused_resnet._C`
# to the installed tree even when `fused_resnet` itself was imported from a copy; a copied tree is
# only a faithful "other checkout" with that finder removed.
_NO_EDITABLE_FINDER = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path\n"
    "                    if 'editable' not in getattr(f, '__name__', type(f).__name__).lower()]\n"
)


def _run(env_extra, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_RESNET_")}
    env.update(env_extra)
    snippet = SNIPPET
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
        snippet = _NO_EDITABLE_FINDER + SNIPPET
    out = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=300,
                         cwd=pythonpath or None)
    assert out.returncode == 0, out.stderr
    count, message, backend = out.stdout.strip().split("\n")
    return int(count), message, backend


def test_disabled_extension_warns_once_and_falls_back():
    count, message, backend = _run({"FUSED_RESNET_DISABLE_C": "1"})
    assert count == 1
    assert "compiled kernels unavailable" in message and "reference implementation" in message
    assert backend == "torch"


def test_quiet_switch_silences_the_warning():
    count, _, backend = _run({"FUSED_RESNET_DISABLE_C": "1", "FUSED_RESNET_QUIET": "1"})
    assert count == 0 and backend == "torch"


def test_source_tree_without_build_explains_how_to_rebuild(tmp_path):
    shutil.copytree(PKG, tmp_path / "fused_resnet", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    count, message, backend = _run({}, tmp_path)
    assert count == 1 and "not built" in message and "pip install --no-build-isolation" in message
    assert backend == "torch"


def test_build_for_another_torch_is_refused_before_loading(tmp_path):
    so = [p for p in PKG.glob("_C*") if p.suffix in (".so", ".pyd")]
    if not so:
        pytest.skip("no compiled _C in this installation")
    shutil.copytree(PKG, tmp_path / "fused_resnet", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "fused_resnet" / "_C_build.json").write_text(json.dumps({"torch_version": "1.0.0"}))
    count, message, backend = _run({}, tmp_path)
    assert count == 1
    assert "built against torch 1.0.0" in message and "rebuild" in message
    assert backend == "torch"
