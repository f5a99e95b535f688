"""Loading the compiled kernels (``fused_resnet._C``) without ever crashing the import.

``_C`` may be missing (no compiler, a source checkout that was never built), built against
another torch (a different ABI: loading it could fail with ``undefined symbol`` or worse), or
deliberately disabled with ``FUSED_RESNET_DISABLE_C=1``. In each case ``import fused_resnet``
still works: it warns once, saying what is missing and how to rebuild, and every op falls back
to the plain-PyTorch reference (correct, not fused).

The build writes ``_C_build.json`` next to the extension (torch version, CUDA archs); it is
compared with the running torch *before* the library is loaded, so a stale build is refused
cleanly instead of being loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings

import torch

REBUILD_HINT = (
    "rebuild it against the installed torch with "
    "`pip install --no-build-isolation --no-deps --force-reinstall .` from the source checkout "
    "(or `pip install --no-build-isolation -e .` for a development install)"
)

OPS = ("conv_bn_act", "conv_bn_act_residual_", "conv_stats", "bn_finalize", "bn_update_running_stats", "bn_add_act",
       "bn_add_act_backward", "stats_backward", "bn_finalize_backward")

_C = None  # the loaded module, or None
kernels: frozenset = frozenset()  # {(op, dispatch key)} compiled into _C, read once at load
build_info: dict = {}  # what the build recorded (empty when unknown)
problem: str | None = None  # why _C is not loaded


def _read_build_record(origin: str) -> dict:
    path = os.path.join(os.path.dirname(origin), "_C_build.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _load() -> None:
    global _C, problem, build_info
    if os.environ.get("FUSED_RESNET_DISABLE_C", "").strip() not in ("", "0"):
        problem = "disabled by FUSED_RESNET_DISABLE_C"
        return
    spec = importlib.util.find_spec("fused_resnet._C")
    if spec is None or spec.origin is None:
        problem = "fused_resnet._C is not built (this is a source tree or the build failed); " + REBUILD_HINT
        return
    build_info = _read_build_record(spec.origin)
    built_for = build_info.get("torch_version")
    if built_for and built_for != torch.__version__:
        problem = (
            f"fused_resnet._C was built against torch {built_for} but torch {torch.__version__} "
            f"is installed; {REBUILD_HINT}"
        )
        return
    try:
        module = importlib.import_module("fused_resnet._C")
    except (ImportError, OSError) as e:
        problem = f"fused_resnet._C failed to load ({e}); {REBUILD_HINT}"
        return
    compiled = module.build_info()
    if compiled.get("torch_version") not in (None, "unknown", torch.__version__):
        problem = (
            f"fused_resnet._C was built against torch {compiled['torch_version']} but torch "
            f"{torch.__version__} is installed; {REBUILD_HINT}"
        )
        return
    compiled["cuda_archs"] = [a for a in str(compiled.get("cuda_archs", "")).split(";") if a]
    build_info = {**build_info, **compiled}
    _C = module
    global kernels
    kernels = frozenset(
        (op, key) for op in OPS for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", key)
    )


_load()
if problem is not None and os.environ.get("FUSED_RESNET_QUIET", "").strip() in ("", "0"):
    warnings.warn(
        f"fused_resnet: compiled kernels unavailable -- {problem}. "
        "Falling back to the PyTorch reference implementation (correct results, no fusion). "
        "Set FUSED_RESNET_QUIET=1 to silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


def available() -> bool:
    return _C is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fused_resnet::<op>`` has a compiled kernel for ``dispatch_key`` ('CPU'/'CUDA').

    Read from a table filled at load time, so it is a constant under torch.compile tracing."""
    return (op, dispatch_key) in kernels
