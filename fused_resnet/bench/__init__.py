"""The benchmark engine behind ``fused-resnet bench`` / ``fused-resnet check`` and ``benchmarks/``.

* :mod:`.config`  -- what a run measures (:class:`BenchConfig`) and the per-device defaults;
* :mod:`.shapes`  -- every convolution of a ResNet with FLOP and minimal-byte counts;
* :mod:`.timing`  -- timing (CPU perf_counter / CUDA events, CUDA graphs), launch counts, peaks;
* :mod:`.layers`, :mod:`.blocks`, :mod:`.models` -- the three levels compared;
* :mod:`.fusing`  -- how fused blocks/models are obtained from the package;
* :mod:`.report`  -- table, JSON, CSV, PNG and the ``benchmarks/results`` writer;
* :mod:`.env`     -- the machine and versions every result carries;
* :mod:`.check`   -- every usable backend against the reference (``fused-resnet check``).
"""

from .config import BenchConfig, resolve
from .run import run_bench

__all__ = ["BenchConfig", "resolve", "run_bench"]
