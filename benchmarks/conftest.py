"""Shared fixtures of the pytest-benchmark suites (``pytest benchmarks/ --benchmark-only``).

Suites are parametrised over devices: ``cpu`` always, ``cuda`` skipped without a CUDA device.
CUDA calls are synchronised inside the timed function (pytest-benchmark times on the host).
Inputs are random (never zeros), channels_last, and rotate over several buffers.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("FUSED_RESNET_QUIET", "1")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def dtype_for(device: str) -> torch.dtype:
    """bfloat16 on CUDA (the benchmark's default there), float32 on CPU."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def synced(fn, device: str):
    """``fn`` followed by a device synchronisation, so host timing covers the GPU work."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


class Rotating:
    """Call ``fn(buffer)`` on the next of several input buffers each time."""

    def __init__(self, buffers, fn):
        self.buffers, self.fn, self.i = buffers, fn, 0

    def __call__(self):
        self.i += 1
        return self.fn(self.buffers[self.i % len(self.buffers)])
