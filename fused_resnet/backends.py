"""Which implementation runs a given call, and why.

Backends:

* ``torch``  -- :mod:`fused_resnet.reference`, plain PyTorch ops (any device/dtype, unfused).
* ``cpu``    -- the C++ kernels in ``fused_resnet._C`` (CPU tensors).
* ``cuda``   -- the CUDA kernels in ``fused_resnet._C`` (CUDA tensors).
* ``triton`` -- Triton kernels (:mod:`fused_resnet.triton`): CUDA tensors in float32/float16/bfloat16,
  or CPU tensors (float32/float16) when ``TRITON_INTERPRET=1`` was set before triton was
  imported (Triton's interpreter, for tests). Triton is imported only when this backend is
  considered, never by ``import fused_resnet``.

Choice, per call: the ``backend=`` argument, else the ``FUSED_RESNET_BACKEND`` environment
variable (read at each call), else ``auto``. ``auto`` takes the first usable backend in a fixed
preference order -- ``cuda``, ``triton``, then ``torch`` on CUDA tensors; ``cpu`` then ``torch``
on CPU tensors (``triton`` on CPU is the interpreter: explicit requests only). (The design asks
for the fastest measured backend; no GPU measurements exist yet, so the order is the documented
stand-in: ``triton`` is second on CUDA until measurements say otherwise.)

A backend that was asked for but cannot run this call (wrong device, dtype, ``_C`` missing) is
never run: the call falls back to the next usable backend, a :class:`FallbackWarning` says so
once per (op, backend, reason), and the decision records the reason. Ask what ran with
:func:`last_decision` or collect every decision of a block of code with :func:`trace`.

Determinism: no kernel uses atomics; every reduction (BN statistics, BN backward sums) merges
fixed chunks in a fixed order, so results are bitwise reproducible run to run (and on CPU
independent of the thread count). ``torch.use_deterministic_algorithms(True)`` changes nothing in
our kernels; it makes the convolutions called through PyTorch (cuDNN's backward) deterministic.
Triton conv outputs are reproducible for a given tuned config; a config chosen by timing may differ
between machines or cache states, and its tile size sets the summation order.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import _ext

BACKENDS = ("torch", "cpu", "cuda", "triton")
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ENV = "FUSED_RESNET_BACKEND"


class FallbackWarning(UserWarning):
    """A requested backend could not run a call; another backend ran it instead."""


@dataclass(frozen=True)
class Decision:
    """The backend chosen for one call.

    Attributes: ``op`` (e.g. ``"conv_bn_act"``), ``backend`` (what runs), ``requested``
    (what was asked: a backend name or ``"auto"``), ``source`` (``"argument"``,
    ``"FUSED_RESNET_BACKEND"`` or ``"default"``) and ``reason`` (why this backend, including
    why any requested backend was passed over).
    """

    op: str
    backend: str
    requested: str
    source: str
    reason: str


_state = threading.local()
_last: dict[str, Decision] = {}
_warned: set[tuple[str, str, str]] = set()


def unsupported_reason(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> str | None:
    """None if ``backend`` can run ``op`` on (device, dtype), else a one-line reason."""
    if backend == "torch":
        return None
    if backend == "triton":
        from .triton import unsupported_reason as triton_reason

        return triton_reason(device, dtype)
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} or 'auto', got {backend!r}")
    if device.type != backend:
        return f"the {backend} backend runs {backend.upper()} tensors, got a tensor on {device}"
    if not _ext.available():
        return "fused_resnet._C is not loaded (see `fused-resnet info`)"
    if dtype not in _KERNEL_DTYPES:
        return f"the {backend} backend supports float32/float64/float16/bfloat16, got {dtype}"
    if not _ext.has_kernel(op, backend.upper()):
        return f"fused_resnet._C was built without {backend.upper()} kernels"
    return None


def _auto_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("cuda", "triton", "torch")
    if device.type == "cpu":
        return ("cpu", "torch")
    return ("torch",)


def _requested(backend: str | None) -> tuple[str, str]:
    if backend is not None:
        name, source = backend, "argument"
    elif os.environ.get(_ENV, "").strip():
        name, source = os.environ[_ENV].strip(), _ENV
    else:
        return "auto", "default"
    if not isinstance(name, str) or name.lower() not in BACKENDS + ("auto",):
        where = "backend" if source == "argument" else _ENV
        raise ValueError(f"{where}: expected one of {', '.join(BACKENDS)} or 'auto', got {name!r}")
    return name.lower(), source


def choose(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None) -> Decision:
    """Pick the backend for one call of ``op`` on tensors of ``device``/``dtype``."""
    requested, source = _requested(backend)
    passed_over = []
    candidates = _auto_order(device)
    if requested != "auto":
        candidates = (requested,) + tuple(b for b in candidates if b != requested)
    for name in candidates:
        why_not = unsupported_reason(name, device, dtype, op)
        if why_not is None:
            if passed_over:
                reason = "; ".join(passed_over) + f"; fell back to {name}"
            elif requested == "auto":
                reason = f"auto: first usable of {', '.join(_auto_order(device))} for {device.type}/{dtype}"
            else:
                reason = f"requested by {source}"
            decision = Decision(op, name, requested, source, reason)
            if requested not in ("auto", name):
                _warn_fallback(op, requested, passed_over[0], name)
            return decision
        passed_over.append(f"{name}: {why_not}")
    raise AssertionError("the torch backend always runs")  # pragma: no cover


def _warn_fallback(op: str, requested: str, why: str, used: str) -> None:
    key = (op, requested, why)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"fused_resnet.{op}: backend {why}; running on the {used} backend instead",
                  FallbackWarning, stacklevel=4)


def record(decision: Decision) -> None:
    """Remember a decision for :func:`last_decision` and any active :func:`trace`.

    Skipped while torch.compile traces (the choice is then made once, at trace time)."""
    if torch.compiler.is_compiling():
        return
    _last[decision.op] = decision
    for log in getattr(_state, "traces", ()):
        log.append(decision)


def tracing() -> bool:
    """True while a :func:`trace` is collecting decisions in this thread."""
    return bool(getattr(_state, "traces", ()))


def last_decision(op: str | None = None) -> Decision | None:
    """The most recent decision for ``op`` (or for any op when ``op`` is None)."""
    if op is not None:
        return _last.get(op)
    return next(reversed(_last.values()), None) if _last else None


@contextlib.contextmanager
def trace() -> Iterator[list[Decision]]:
    """Collect the :class:`Decision` of every fused op called in the block (this thread)::

        with fused_resnet.backends.trace() as log:
            y = fused_resnet.functional.conv_bn_act(x, w, scale, shift)
        print(log[0].backend, log[0].reason)
    """
    log: list[Decision] = []
    stack = getattr(_state, "traces", ())
    _state.traces = stack + (log,)
    try:
        yield log
    finally:
        _state.traces = stack


def usable_backends(device: torch.device | str, dtype: torch.dtype = torch.float32, op: str = "conv_bn_act"):
    """``{backend: None or reason it cannot run}`` for ``op`` on this device/dtype."""
    device = torch.device(device)
    return {b: unsupported_reason(b, device, dtype, op) for b in BACKENDS}
