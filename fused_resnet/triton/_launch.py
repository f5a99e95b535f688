"""One place that launches every Triton kernel of the backend."""

from __future__ import annotations

import torch
from torch.library import wrap_triton

from . import interpret_mode


def _is_fake(t) -> bool:
    return isinstance(t, torch.Tensor) and torch._subclasses.fake_tensor.is_fake(t)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``.

    On a GPU, ``wrap_triton`` is what lets torch.compile trace the kernel as a graph node (and
    skip it on fake tensors). Triton's interpreter functions are not traceable kernels, so under
    ``TRITON_INTERPRET=1`` a launch on fake/functional tensors (torch.compile tracing the op's
    body) is skipped here: the outputs' shapes come from the torch ops around the launch, and
    the compiled graph still runs the real kernel on real tensors. This keeps the
    ``torch.compile(fullgraph=True)`` tests meaningful on CPU.
    """
    if interpret_mode():
        if any(_is_fake(a) for a in args):
            return
        # What wrap_triton does with an interpreted kernel on torch 2.14 (it returns it as is);
        # torch 2.11's wrap_triton raises "only works on functions annotated with triton.jit".
        kernel[grid](*args, **kwargs)
        return
    first = args[0]
    if first.device.type == "cuda" and first.device.index not in (None, torch.cuda.current_device()):
        # Triton launches on the current device: make it the tensors' device (cuda:1, ...).
        with torch.cuda.device(first.device):
            wrap_triton(kernel)[grid](*args, **kwargs)
        return
    wrap_triton(kernel)[grid](*args, **kwargs)
