"""Timing, launch counting and on-the-spot peak measurements.

Method (the design's "performance method"):

* **CPU**: ``time.perf_counter`` around each call, after ``warmup`` untimed calls.
* **CUDA**: a pair of CUDA events around each call (device time, not host time), after
  ``warmup`` untimed calls; one synchronisation at the end so calls queue back to back.
  Whole-model inference can be replayed from CUDA graphs (see :func:`cuda_graph_callable`) so
  the host's launch overhead does not count against a model with many small kernels.
* Each call gets input buffer ``i % n_buffers`` (the caller's ``fn(i)``): several buffers, each
  larger than nothing, so a kernel never finds its input still in L2 from the previous repeat.
* Reported: median, 20th and 80th percentiles of the per-call times (milliseconds).

Launch counts come from :mod:`torch.profiler`: on CUDA the number of GPU kernels a call runs
(the evidence for "one launch per conv + BN + add + ReLU"); on CPU, where there are no kernel
launches, the number of top-level operators dispatched (``aten::*`` / ``fused_resnet::*`` not
nested inside another operator; forward and backward).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Timing:
    """Per-call times in milliseconds over ``repeats`` timed calls; ``method`` says how."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    method: str
    samples: list[float] = field(default_factory=list, repr=False)  # the per-call times, in call order

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("samples")
        return d


def _quantile(sorted_vals: list[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_ms: list[float], method: str) -> Timing:
    s = sorted(times_ms)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s), method, list(times_ms))


def combine_processes(per_process: list[Timing]) -> Timing:
    """One figure from timings taken in several fresh processes: the median of the processes'
    medians (a process whose heap or thread state happened to be slow or fast moves it by at most
    one rank), with the 20th/80th percentiles and count of all their calls pooled."""
    pooled = [t for tm in per_process for t in tm.samples]
    out = summarize(pooled, f"{per_process[0].method}, median of {len(per_process)} fresh processes' medians")
    out.median_ms = statistics.median(tm.median_ms for tm in per_process)
    return out


def measure(fn: Callable[[int], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Time ``fn(i)`` (``i`` = call index, for buffer rotation) on ``device``.

    ``warmup`` untimed calls first (autotuning, allocator, caches), then ``repeats`` timed ones.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    if device.type == "cuda":
        for i in range(warmup):
            fn(i)
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            starts[i].record()
            fn(warmup + i)
            ends[i].record()
        torch.cuda.synchronize(device)
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)], "cuda-events")
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(warmup + i)
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, "perf_counter")


def cuda_graph_callable(fn: Callable[[int], object], n_buffers: int, warmup: int = 3):
    """Capture ``fn(b)`` for each buffer index ``b`` into its own CUDA graph and return
    ``replay(i)`` that replays graph ``i % n_buffers``. One graph per buffer keeps the buffer
    rotation without a copy into a static input. Raises whatever capture raises (the caller
    falls back to eager timing and says so)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(warmup):
            fn(i % n_buffers)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graphs = []
    pool = None
    for b in range(n_buffers):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            fn(b)
        pool = g.pool()
        graphs.append(g)
    torch.cuda.synchronize()

    def replay(i: int) -> None:
        graphs[i % n_buffers].replay()

    return replay


#: launch count of torch.compile'd code on a CPU: inductor's C++ kernels are not dispatcher ops,
#: so the profiler would count 0 -- reported as "not counted" instead of a flattering zero
NOT_COUNTED_CPU_COMPILED = (None, "not counted (compiled CPU code)")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (some profiler builds print a line per start/stop from C++,
    which would drown the progress bar). Exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def count_launches(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Run ``fn()`` once under :mod:`torch.profiler` and count what it launched.

    Returns ``(count, unit)``: ``unit`` is ``"cuda kernels"`` on CUDA (GPU kernel events,
    memcpy/memset excluded) and ``"top-level ops"`` on CPU. ``(None, reason)`` if the profiler
    failed."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        with _quiet_stderr(), profile(activities=acts) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        events = prof.events()
    except Exception as exc:  # the profiler is optional evidence, never a reason to fail a run
        return None, f"profiler failed: {type(exc).__name__}: {exc}"[:200]
    if device.type == "cuda":
        n = 0
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                name = e.name.lower()
                if not (name.startswith("memcpy") or name.startswith("memset")):
                    n += 1
        return n, "cuda kernels"
    return sum(1 for e in events if _outermost_op(e)), "top-level ops"


_OP_PREFIXES = ("aten::", "fused_resnet::")


def _outermost_op(e) -> bool:
    """An ``aten::`` / ``fused_resnet::`` event not nested inside another such op: what Python, an
    autograd node (backward included) or a ``torch.autograd.Function`` (the fused blocks' training
    tapes) dispatched, not what an op called inside its own kernel."""
    if not e.name.startswith(_OP_PREFIXES):
        return False
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(_OP_PREFIXES):
            return False
        p = p.cpu_parent
    return True


def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    """Measure this machine's attainable peaks on the spot (not datasheet figures):

    * ``tflops``: a large square matmul in ``dtype`` (8192 on CUDA, 1024 on CPU; half those
      with ``quick``), ``2 n^3`` FLOPs per call;
    * ``gbps``: a large device-to-device copy (1 GiB on CUDA, 64 MiB on CPU), counting bytes
      read plus bytes written.

    Timed like everything else (median of repeats). TF32 is left as the caller set it.
    """
    on_gpu = device.type == "cuda"
    n = (8192 if on_gpu else 1024) // (2 if quick else 1)
    mm_dtype = dtype if (on_gpu or dtype in (torch.float32, torch.float64)) else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    t_mm = measure(lambda i: torch.mm(a, b), device, warmup=2 if on_gpu else 1, repeats=20 if on_gpu else 3)
    nbytes = (2**30 if on_gpu else 2**26) // (4 if quick else 1)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t_cp = measure(lambda i: dst.copy_(src), device, warmup=2, repeats=20 if on_gpu else 5)
    return {
        "tflops": 2 * n**3 / (t_mm.median_ms * 1e-3) / 1e12,
        "tflops_dtype": str(mm_dtype).replace("torch.", ""),
        "tflops_method": f"torch.mm {n}x{n}x{n}",
        "gbps": 2 * nbytes / (t_cp.median_ms * 1e-3) / 1e9,
        "gbps_method": f"copy of {nbytes // 2**20} MiB (read + write)",
    }
