"""The Triton backend: implicit-GEMM convolution with fused prologue/epilogue, BatchNorm kernels,
and their backward, registered as PyTorch ops.

Layout:

* :mod:`.conv` -- the implicit-GEMM convolution kernel (NHWC activations, prologue
  ``relu?(x * in_scale + in_shift)``, epilogue ``relu?(acc * scale + shift + residual?)`` or raw
  ``z`` plus per-channel statistics) and its launchers ``conv_bn_act`` / ``conv_stats``.
* :mod:`.bn` -- ``bn_finalize``, ``bn_update_running_stats``, ``bn_add_act``,
  ``bn_add_act_backward`` (ReLU mask + both reductions + the elementwise gradients in one pass),
  ``stats_backward``.
* :mod:`.ops` -- ``torch.library.triton_op`` registrations in the ``fused_resnet_triton``
  namespace (same argument names and meaning as ``fused_resnet::*`` in ``csrc/ops.cpp``) with
  autograd.

Where it runs (decided once, when this package is first imported): CUDA tensors, or CPU tensors
when ``TRITON_INTERPRET=1`` was set before triton was imported (Triton's interpreter; float32
and float16 only -- the interpreter's ``tl.dot`` cannot take bfloat16). float64 is not supported
(the C++ backends and the reference handle it).

Decisions:

* Autotuning (conv kernel only) is keyed on the GEMM shape, convolution geometry, epilogue and
  dtypes; with triton >= 3.2 results persist through ``triton.autotune(cache_results=True)`` in
  triton's cache directory (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), keyed by triton
  version, GPU target, kernel source and shape, so a second process does not re-tune
  (``TRITON_PRINT_AUTOTUNING=1`` shows when tuning runs). Tuning re-runs a kernel several
  times, so no tuned kernel accumulates anything: statistics are per-16-row partials written to
  fixed slots (identical for every config) and reduced by a separate kernel; running
  statistics are updated by their own op.
* Weights are packed to ``(groups, R, S, C/groups, K/groups)`` once and the packed copy is
  cached while the weight is unchanged (``_version``), alive and not being traced
  (:mod:`._pack` documents the key, the bound, the locking and the bypasses).
* Autocast (CPU/CUDA) casts the activation arguments of ``conv_bn_act``, ``conv_stats`` and
  ``bn_add_act`` exactly as for the compiled ops (:mod:`.ops`).
* ``auto`` backend order on CUDA is ``cuda``, ``triton``, ``torch`` until GPU measurements exist.

Nothing here is imported by ``import fused_resnet``: :func:`unsupported_reason` imports triton
lazily, so a machine without triton pays nothing.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["interpret_mode", "triton_import_error", "unsupported_reason", "load_ops", "DTYPES",
           "old_interpreter_reason"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET_DTYPES = (torch.float32, torch.float16)


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when triton imports, else the import error as one line."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"{type(e).__name__}: {e}"
    return None


def old_interpreter_reason(version: str | None = None) -> str | None:
    """Why triton ``version`` (default: the installed one)'s interpreter cannot run these kernels,
    or None.

    Triton 3.6's interpreter turns a scalar into an index with ``int(data)`` on a 1-element numpy
    array (a kernel argument such as ``Cg`` is one), which numpy refuses, so every kernel here
    whose loop bound is computed from its arguments stops with "only 0-dimensional arrays can be
    converted to Python scalars"; 3.7 squeezes first. The GPU path is not affected (the sm_90
    compile tests pass on 3.6), only CPU tensors under ``TRITON_INTERPRET=1``. Checked 2026-12-06:
    with that one interpreter line patched, 3.6 ran all of tests/triton under torch 2.11 and 2.14."""
    if version is None:
        if triton_import_error() is not None:
            return None
        import triton

        version = triton.__version__
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return None  # an unparseable (development) version: assume it is recent
    if (major, minor) < (3, 7):
        return (f"triton {version}'s interpreter cannot run these kernels (it fails on loop bounds computed "
                f"from kernel arguments; fixed in triton 3.7)")
    return None


@functools.lru_cache(maxsize=1)
def interpret_mode() -> bool:
    """Whether Triton kernels run on the interpreter (CPU tensors).

    Triton decides this when a kernel is decorated, so what counts is ``TRITON_INTERPRET`` at
    the time our kernels are first defined; it is read once and cached. It is only honoured if
    triton itself had not been imported before the variable was set (then its jit objects would
    not be interpreted functions): checked on the kernels themselves once they are defined.
    """
    if not _env_interpret():
        return False
    if triton_import_error() is not None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from . import bn

    return isinstance(bn.bn_finalize_kernel, InterpretedFunction)


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the Triton backend can run on (device, dtype), else a one-line reason."""
    err = triton_import_error()
    if err is not None:
        return f"triton does not import ({err})"
    if device.type == "cuda":
        if dtype not in DTYPES:
            return f"the Triton backend supports float32/float16/bfloat16 on CUDA, got {dtype}"
        return None
    if device.type == "cpu":
        if not interpret_mode():
            return ("the Triton backend is not implemented for CPU tensors (it runs CUDA tensors, or CPU "
                    "tensors when TRITON_INTERPRET=1 was set before triton was imported)")
        too_old = old_interpreter_reason()
        if too_old is not None:
            return too_old
        if dtype not in INTERPRET_DTYPES:
            return (f"the Triton interpreter (TRITON_INTERPRET=1) supports float32/float16 "
                    f"(its tl.dot cannot take bfloat16), got {dtype}")
        return None
    return f"the Triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"


@functools.lru_cache(maxsize=1)
def load_ops():
    """Import and register the ``fused_resnet_triton`` ops; returns ``torch.ops.fused_resnet_triton``."""
    from . import ops  # noqa: F401  (registers on import)

    return torch.ops.fused_resnet_triton
