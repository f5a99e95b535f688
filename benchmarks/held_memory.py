"""Memory of a training step, counted exactly: eager torchvision vs the fused model.

Issue #7's GPU training target asks for peak memory <= 0.8x eager AMP's. What a step holds is a
property of the graph, not of the device: which tensors the forward keeps for backward, and how
large the backward's working set gets. This script counts both on any device, so the GPU ratio
can be predicted before a GPU is lent::

    python benchmarks/held_memory.py                       # ResNet-50, batch 4, float32, bfloat16, amp
    python benchmarks/held_memory.py --dtype bfloat16 --batch 8 --model resnet18

How: a ``TorchDispatchMode`` sees every op call of one training step (forward, cross-entropy,
backward). It records each output's storage with a weak reference and its size. At every op
boundary it sums the storages still alive, which is the memory that op outputs hold at that
moment. Reported per variant:

* ``held after forward``: what is alive once the loss exists, before backward starts. That is
  what autograd (and the fused blocks' tapes) keep for backward, plus the logits and the loss.
* ``peak``: the largest sum over the whole step, backward included.

Views count once (by storage); an output that shares an input's storage (a view or an in-place
result, e.g. the transposed fc weight) allocated nothing and is not counted. Parameters and the
input are not op outputs, so they are not counted; they are the same on both sides. A weight that
the fused forward folds or packs is an op output and is counted. Not seen: temporaries that a C++
kernel allocates and frees inside one op. They are transient and below the op-boundary peaks.
Parameter gradients are counted in ``peak`` (they are op outputs), so at small batches the peak
ratio is near 1; the activations grow with the batch, the gradients do not.

Eager runs torchvision's model in the given dtype, channels_last. The fused side is
``fused_resnet.models`` with the same weights and the default backend (``cpu`` here). On a GPU
under AMP the dtypes of a few small tensors differ (BN statistics); the activations, which
dominate, have the same sizes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LiveBytes(TorchDispatchMode):
    """Sums, at every op boundary, the bytes of op-output storages that are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.ops = 0

    def now(self) -> int:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            del self.live[k]
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        # An output that shares an input's storage (a view, an in-place op) allocated nothing.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                key = s.data_ptr() or id(s)
                if s.nbytes() and key not in self.live and key not in inputs:
                    self.live[key] = (StorageWeakRef(s), s.nbytes())
        self.peak = max(self.peak, self.now())
        return out


def build(name: str, variant: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    import torchvision

    import fused_resnet.models

    torch.manual_seed(seed)
    tv = getattr(torchvision.models, name)()
    if variant == "eager":
        model = tv
    else:
        model = getattr(fused_resnet.models, name)()
        model.load_state_dict(tv.state_dict())
    return model.to(dtype=dtype, memory_format=torch.channels_last).train()


def measure(name: str, variant: str, dtype: torch.dtype | str, batch: int, size: int) -> dict:
    """One counted training step. ``dtype="amp"``: a float32 model under bfloat16 autocast (the
    GPU target's "eager AMP"; here CPU autocast, whose casts of the activations match CUDA's)."""
    amp = dtype == "amp"
    if amp:
        dtype = torch.float32
    model = build(name, variant, dtype)
    x = torch.randn(batch, 3, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,))

    def loss_of():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        return torch.nn.functional.cross_entropy(out.float(), y)

    # One untracked step first: folds, packs and caches are made as they would be in a long run.
    loss_of().backward()
    model.zero_grad(set_to_none=True)
    mode = LiveBytes()
    with mode:
        loss = loss_of()
        held = mode.now()
        loss.backward()
    return {"variant": variant, "held_after_forward": held, "peak": mode.peak, "ops": mode.ops}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="float32,bfloat16,amp",
                   help="comma-separated; amp = float32 model under bfloat16 autocast")
    args = p.parse_args(argv)
    mib = 2.0 ** 20
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, channels_last, torch {torch.__version__}")
    for dname in args.dtype.split(","):
        dtype = dname if dname == "amp" else getattr(torch, dname)
        rows = [measure(args.model, v, dtype, args.batch, args.size) for v in ("eager", "fused")]
        e = rows[0]
        for r in rows:
            print(f"  {dname:9s} {r['variant']:6s} held after forward {r['held_after_forward'] / mib:8.1f} MiB "
                  f"({r['held_after_forward'] / e['held_after_forward']:.2f}x eager)   peak {r['peak'] / mib:8.1f} MiB "
                  f"({r['peak'] / e['peak']:.2f}x eager)   ops {r['ops']}")


if __name__ == "__main__":
    main()
