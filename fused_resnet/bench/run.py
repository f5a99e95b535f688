"""``run_bench(cfg)``: measure peaks, then the whole model, the layers and the blocks (in that
order, so a ``--time-budget`` cuts the per-block detail first), and collect one result dict (see
:mod:`.report` for its layout)."""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

from . import timing
from ._util import Progress, add_speedups
from .config import BenchConfig, resolve, start_clock
from .env import collect_env
from .shapes import conv_shapes


def run_bench(cfg: BenchConfig, argv: list[str] | None = None, log=None) -> dict:
    """Run the benchmark described by ``cfg`` and return the result dict.

    ``log`` (default: stderr) receives one line per phase; progress bars go to stderr.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    try:
        return _run(cfg, argv, log)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this run only


def _run(cfg: BenchConfig, argv, log) -> dict:
    cfg = resolve(cfg)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    start_clock(cfg)
    torch.manual_seed(cfg.seed)
    env = collect_env(argv)
    notes = []
    if cfg.device == "cpu":
        notes.append("CPU run: GPU figures (cuDNN, cuDNN fused conv-add-relu, max-autotune, CUDA graphs, "
                     "kernel launch counts) need a GPU")
    if cfg.device == "cpu":
        notes.append(f"CPU threads: {cfg.threads} ({cfg.threads_reason})")
    if cfg.device == "cuda":
        torch.backends.cudnn.benchmark = True
    from .models import build_torchvision

    tv = build_torchvision(cfg.model, cfg.seed)
    peaks = None
    if cfg.peaks:
        log("measuring peaks (matmul TFLOP/s, copy GB/s) ...")
        peaks = timing.measure_peaks(cfg.torch_device, cfg.torch_dtype, quick=cfg.device == "cpu")
    rows: list[dict] = []
    phases = {}
    if "model" in cfg.levels:
        from .models import bench_models

        n_var = len(cfg.backends) + len(cfg.baselines)
        log(f"whole model: {cfg.model}, batch {cfg.batch} (training {cfg.train_batch})")
        p = Progress(n_var * len(cfg.modes), "model", cfg.progress)
        t = time.perf_counter()
        rows += bench_models(cfg, tv, peaks, p)
        p.close()
        phases["model_s"] = time.perf_counter() - t
    if "layer" in cfg.levels:
        shapes = conv_shapes(tv, cfg.batch, cfg.size)
        log(f"per layer: {len(shapes)} distinct convolutions x {len(cfg.modes)} modes")
        p = Progress(len(shapes) * len(cfg.modes), "layers", cfg.progress)
        t = time.perf_counter()
        from .layers import bench_layers

        rows += bench_layers(cfg, shapes, peaks, p)
        p.close()
        phases["layer_s"] = time.perf_counter() - t
    if "block" in cfg.levels:
        from .blocks import bench_blocks, pick_blocks

        names = pick_blocks(tv)
        log(f"per block: {len(names)} blocks x {len(cfg.modes)} modes")
        p = Progress(len(names) * len(cfg.modes), "blocks", cfg.progress)
        t = time.perf_counter()
        rows += bench_blocks(cfg, tv, peaks, p)
        p.close()
        phases["block_s"] = time.perf_counter() - t
    add_speedups(rows)
    config = dataclasses.asdict(cfg)
    skipped = config.pop("skipped")
    phases["total_s"] = time.perf_counter() - t0
    return {"env": env, "config": config, "peaks": peaks, "skipped": skipped, "notes": notes,
            "phases": phases, "rows": rows}
