"""The conv kernel's packed weights, cached: ``(K, Cg, R, S)`` -> ``(groups, R, S, Cg, Kg)``.

Packing is a permute + copy of the whole weight on every call; in inference (and between
optimizer steps) the weight does not change, so the packed copy is kept and reused.

Decisions (each one is a way a stale or wrong packed weight could otherwise be served):

* **Key**: ``(data_ptr, shape, stride, dtype, device, groups)`` -- what identifies the memory the
  packed copy was read from and how it was read. The weight's ``_version`` (bumped by every
  in-place write through autograd-visible tensors: ``add_``, ``copy_``, optimizer steps,
  ``load_state_dict``) is stored with the entry and compared on lookup: a different version is a
  miss and the entry is *replaced*, so a weight updated every training step holds one entry, not
  one per step.
* **Liveness**: the entry holds a weak reference to the weight it was packed from and counts
  only while that tensor is alive. Once it is freed, its address can be reused by a new tensor
  with the same shape and ``_version`` 0 (the caching allocator does exactly that with per-call
  temporaries such as an autocast-cast weight): a dead reference is a miss. While the original is
  alive, another tensor with the same address, shape and strides shares its storage (a view or
  ``detach()``), so it holds the same values. Dead entries are swept by the weakref callback when
  the lock is free, and otherwise at the next lookup, so a freed model's packed weights do not
  linger.
* **Bound**: at most :data:`MAX_ENTRIES` entries (``FUSED_RESNET_TRITON_PACK_CACHE``; default
  512, more than the convolutions of any torchvision ResNet/ResNeXt/Wide ResNet; ``0`` disables
  the cache), least recently used evicted first. The cost is one extra copy of each cached weight.
* **Thread safety**: one lock around the dictionary; the packing itself runs outside the lock
  (two threads missing at once both pack, the second insert wins -- both results are correct).
  The weakref callback never blocks on the lock (it may run on any thread, including one that
  holds it, whenever the last reference to a weight goes away).
* **Bypassed** (packed afresh, nothing stored) when a cached tensor would be wrong or cannot be
  checked: under ``torch.compile`` / ``torch.export`` tracing (``torch.compiler.is_compiling()``
  or an active ``TorchDispatchMode`` such as FakeTensorMode/proxy tracing: the packing must be
  traced into the graph, not read as a constant), while a CUDA graph is being captured on the
  current stream (a replay runs no Python, so a cached packed weight would be replayed as a
  constant even after an optimizer step updated the weight in place; packing inside the
  capture makes every replay repack), for tensor subclasses (FakeTensor,
  FunctionalTensor, DTensor, ...: no real address), for inference tensors (no version counter,
  so an in-place update could not be seen), and for empty weights.
* **Known hole**: writes through ``weight.data`` (or ``detach()`` under ``torch.no_grad`` of a
  tensor with its own version counter) do not bump the weight's ``_version``; after such a write
  call :func:`clear` (``nn.Module`` code paths, optimizers and ``load_state_dict`` all bump it).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict

import torch

__all__ = ["pack_weight", "packed_weight", "clear", "cache_info", "bypass_reason", "MAX_ENTRIES"]


def _max_entries() -> int:
    raw = os.environ.get("FUSED_RESNET_TRITON_PACK_CACHE", "512").strip()
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"FUSED_RESNET_TRITON_PACK_CACHE: expected a non-negative integer, got {raw!r}") from None
    if n < 0:
        raise ValueError(f"FUSED_RESNET_TRITON_PACK_CACHE: expected a non-negative integer, got {raw!r}")
    return n


MAX_ENTRIES = _max_entries()


def pack_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(K, Cg, R, S) -> (groups, R, S, Cg, Kg) contiguous: the kernel's B operand, Kg fastest.

    No caching (see :func:`packed_weight`)."""
    k, cg, r, s = weight.shape
    return weight.reshape(groups, k // groups, cg, r, s).permute(0, 3, 4, 2, 1).contiguous()


class _Entry:
    __slots__ = ("ref", "version", "packed")

    def __init__(self, ref, version, packed):
        self.ref = ref
        self.version = version
        self.packed = packed


_lock = threading.Lock()
_entries: OrderedDict[tuple, _Entry] = OrderedDict()
_dead: list[tuple] = []  # keys whose weight died while the lock was held (list.append is atomic)
_stats = {"hits": 0, "misses": 0, "bypassed": 0, "evictions": 0}


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream (never true off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def bypass_reason(weight: torch.Tensor) -> str | None:
    """None when ``weight``'s packed copy may be cached, else why not (see the module docstring)."""
    if torch.compiler.is_compiling():
        return "tracing under torch.compile"
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return "a TorchDispatchMode is active (fake/proxy tracing)"
    if _capturing(weight.device):
        return "a CUDA graph is being captured"
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return f"tensor subclass {type(weight).__name__}"
    if weight.is_inference():
        return "inference tensor (no version counter)"
    if weight.numel() == 0:
        return "empty weight"
    if MAX_ENTRIES == 0:
        return "cache disabled (FUSED_RESNET_TRITON_PACK_CACHE=0)"
    return None


def _sweep_locked() -> None:
    """Remove the entries of freed weights (every freed weight's callback queued its key)."""
    while _dead:
        key = _dead.pop()
        e = _entries.get(key)
        if e is not None and e.ref() is None:
            del _entries[key]


def _on_weight_freed(key):
    def callback(_ref):
        _dead.append(key)
        if _lock.acquire(blocking=False):  # never wait: this may run on a thread that holds the lock
            try:
                _sweep_locked()
            finally:
                _lock.release()

    return callback


def packed_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`pack_weight`, served from the cache when ``weight`` has not changed since it was packed.

    weight: (K, C/groups, R, S), any dtype/device/strides. Returns a contiguous
    (groups, R, S, C/groups, K/groups) tensor of the same dtype and device; treat it as read-only
    (it may be shared with later calls).
    """
    if bypass_reason(weight) is not None:
        with _lock:
            _stats["bypassed"] += 1
        return pack_weight(weight, groups)
    key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight.dtype, weight.device, groups)
    version = weight._version
    with _lock:
        _sweep_locked()
        e = _entries.get(key)
        if e is not None and e.version == version and e.ref() is not None:
            _entries.move_to_end(key)
            _stats["hits"] += 1
            return e.packed
        _stats["misses"] += 1
    packed = pack_weight(weight, groups)
    if packed.data_ptr() == weight.data_ptr():
        return packed  # already in packed order (a view): nothing to save by keeping it
    entry = _Entry(weakref.ref(weight, _on_weight_freed(key)), version, packed)
    with _lock:
        _entries[key] = entry
        _entries.move_to_end(key)
        while len(_entries) > MAX_ENTRIES:
            _entries.popitem(last=False)
            _stats["evictions"] += 1
    return packed


def clear() -> None:
    """Drop every cached packed weight (and reset the counters of :func:`cache_info`)."""
    with _lock:
        _entries.clear()
        _dead.clear()
        for k in _stats:
            _stats[k] = 0


def cache_info() -> dict:
    """``{"entries", "max_entries", "hits", "misses", "bypassed", "evictions"}`` (a snapshot)."""
    with _lock:
        _sweep_locked()
        return {"entries": len(_entries), "max_entries": MAX_ENTRIES, **_stats}
