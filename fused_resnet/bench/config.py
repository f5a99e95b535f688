"""What one ``fused-resnet bench`` run measures, and the defaults per machine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODES = ("inference", "training")
LEVELS = ("layer", "block", "model")
#: Baselines (what the fused backends are compared with):
#: ``eager`` = eager PyTorch on NCHW tensors (cuDNN on a GPU, oneDNN on a CPU);
#: ``eager_cl`` = the same on channels_last tensors;
#: ``cudnn_fused`` = cuDNN's own fused ``torch.cudnn_convolution_add_relu`` /
#: ``torch.cudnn_convolution_relu`` with the BN folded into weight and bias (CUDA, inference,
#: convs that end in ReLU; per layer only);
#: ``conv_only`` = ``F.conv2d`` alone on channels_last tensors (cuDNN on a GPU), inference, per
#: layer only: the yardstick of the ``pct_conv_only_tflops`` column ("% of cuDNN's conv TFLOP/s");
#: ``compile`` = ``torch.compile`` (default mode) of the eager channels_last code;
#: ``compile_max`` = ``torch.compile(mode="max-autotune")`` with inductor freezing, inference,
#: whole models only (its compile time per shape is minutes).
BASELINES = ("eager", "eager_cl", "cudnn_fused", "conv_only", "compile", "compile_max")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass
class BenchConfig:
    """One benchmark run. ``None`` fields get per-device defaults from :func:`resolve`."""

    model: str = "resnet50"
    device: str | None = None  # "cuda" when available, else "cpu"
    dtype: str | None = None  # bfloat16 on CUDA, float32 on CPU
    batch: int | None = None  # inference batch: 64 on CUDA, 8 on CPU
    train_batch: int | None = None  # training batch: same as batch on CUDA, 4 on CPU
    layer_batch: int | None = None  # per-layer and per-block batch (default: batch / train_batch on CUDA, 2 on CPU)
    #: Whole-model training in a 16-bit dtype: "amp" = float32 parameters (and input) under
    #: ``torch.autocast(dtype)``, as mixed-precision training is run and as issue #7's target
    #: ("eager AMP") is stated; "cast" = the model cast to ``dtype``, BN parameters included.
    #: Default "amp" for bfloat16/float16, "cast" otherwise (float32/float64 have no AMP).
    #: Layer and block training rows always cast (they time one layer or block in ``dtype``).
    train_precision: str | None = None
    size: int = 224
    modes: tuple[str, ...] = MODES
    levels: tuple[str, ...] = LEVELS
    backends: tuple[str, ...] | None = None  # fused backends; None = every usable one except "torch"
    baselines: tuple[str, ...] | None = None
    warmup: int | None = None
    repeats: int | None = None
    n_buffers: int | None = None
    cuda_graphs: bool = True
    peaks: bool = True
    progress: bool = True
    seed: int = 0
    threads: int | None = None  # CPU threads; None = torch's default, or 1 when the machine is busy (see resolve)
    compile_levels: tuple[str, ...] = LEVELS  # levels at which the compile baseline runs
    time_budget_s: float | None = None  # no new measurement after this many seconds (rest: skipped)
    #: Whole-model timing in this many rounds of fresh processes (one process per variant per round,
    #: the variants alternating within a round; the figure is the median of the processes' medians),
    #: or 0 = every variant in this process, one after another. Default: 3 on a CPU, 0 on CUDA.
    #: Why: on a CPU a model's time follows its process's heap state (fresh large outputs fault
    #: their pages in or not) -- one-process runs of the same code gave eager_cl 461 ms in one
    #: process and 628-690 ms in two others (benchmarks/NOTES.md, 2026-12-05); on a GPU device
    #: events and the caching allocator make one process reliable.
    processes: int | None = None
    skipped: list[dict] = field(default_factory=list)  # what was left out and why, filled by resolve
    baselines_explicit: bool = False  # the user named the baselines (set by resolve)
    threads_reason: str = ""  # why cfg.threads has its value (set by resolve)
    warmup_explicit: bool = False  # the user set the warm-up (set by resolve)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def resolve(cfg: BenchConfig) -> BenchConfig:
    """Fill per-device defaults and validate; records skipped baselines in ``cfg.skipped``.

    CPU defaults are sized to finish in about three minutes on two busy cores: inference batch
    8, training batch 4, per-layer and per-block batch 2, 1 warm-up and 3 timed repeats at model
    level (5 at layer/block level, via :func:`repeats_for`), and no ``torch.compile`` (compiling
    costs more than the whole run; ask for it with ``--baselines``).
    """
    from fused_resnet import backends

    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
    gpu = cfg.device == "cuda"
    if cfg.dtype is None:
        cfg.dtype = "bfloat16" if gpu else "float32"
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    low = cfg.dtype in ("bfloat16", "float16")
    if cfg.train_precision is None:
        cfg.train_precision = "amp" if low else "cast"
    if cfg.train_precision not in ("amp", "cast"):
        raise ValueError(f"train_precision: expected 'amp' or 'cast', got {cfg.train_precision!r}")
    if cfg.train_precision == "amp" and not low:
        raise ValueError(f"train_precision: 'amp' needs dtype bfloat16 or float16 (autocast's dtype), "
                         f"got dtype {cfg.dtype!r}")
    cfg.batch = cfg.batch or (64 if gpu else 8)
    cfg.train_batch = cfg.train_batch or (cfg.batch if gpu else max(2, min(4, cfg.batch)))
    if cfg.layer_batch is None and not gpu:
        cfg.layer_batch = min(2, cfg.batch)
    for name in ("batch", "train_batch", "layer_batch", "size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {getattr(cfg, name)}")
    if cfg.size < 32:
        raise ValueError(f"size: expected >= 32 (a ResNet downsamples 32x), got {cfg.size}")
    cfg.warmup_explicit = cfg.warmup is not None
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (10 if gpu else 1)
    cfg.repeats = cfg.repeats or (50 if gpu else 3)
    if cfg.repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {cfg.repeats}")
    cfg.n_buffers = cfg.n_buffers or (3 if gpu else 2)
    if cfg.processes is None:
        cfg.processes = 0 if gpu else 3
    if cfg.processes < 0:
        raise ValueError(f"processes: expected 0 (this process) or a positive number of rounds, got {cfg.processes}")
    _set_threads(cfg)
    for m in cfg.modes:
        if m not in MODES:
            raise ValueError(f"modes: expected a subset of {', '.join(MODES)}, got {m!r}")
    for name in ("levels", "compile_levels"):
        for lv in getattr(cfg, name):
            if lv not in LEVELS:
                raise ValueError(f"{name}: expected a subset of {', '.join(LEVELS)}, got {lv!r}")
    if cfg.backends is None:
        cfg.backends = tuple(b for b in ("cuda", "triton", "cpu")
                             if backends.unsupported_reason(b, cfg.torch_device, cfg.torch_dtype, "conv_bn_act")
                             is None)
        for b in ("cuda", "triton", "cpu"):
            why = backends.unsupported_reason(b, cfg.torch_device, cfg.torch_dtype, "conv_bn_act")
            if why is not None:
                cfg.skipped.append({"what": f"fused:{b}", "why": why})
    else:
        for b in cfg.backends:
            if b not in backends.BACKENDS:
                raise ValueError(f"backends: expected a subset of {', '.join(backends.BACKENDS)}, got {b!r}")
    cfg.baselines_explicit = cfg.baselines is not None
    if cfg.baselines is None:
        cfg.baselines = ("eager", "eager_cl", "cudnn_fused", "conv_only", "compile", "compile_max") if gpu else (
            "eager", "eager_cl")
        if not gpu:
            cfg.skipped.append({"what": "cudnn_fused, compile_max",
                                "why": "GPU-only baselines (cuDNN's fused conv-add-relu; max-autotune "
                                       "tunes GPU kernels); GPU figures need a GPU"})
            cfg.skipped.append({"what": "compile",
                                "why": "not by default on a CPU: compiling ResNet-50 alone takes about a minute "
                                       "on 2 idle cores (more when busy), over this run's time budget; add it with "
                                       "--baselines eager,eager_cl,compile (model level; per layer/block too when "
                                       "named)"})
    for b in cfg.baselines:
        if b not in BASELINES:
            raise ValueError(f"baselines: expected a subset of {', '.join(BASELINES)}, got {b!r}")
    return cfg


def compile_at(cfg: BenchConfig, level: str) -> bool:
    """Whether the ``compile`` baseline runs at ``level`` (when it is among the baselines): at
    every level on CUDA; on a CPU at every level too, since there it only runs when the user
    named it."""
    return "compile" in cfg.baselines and level in cfg.compile_levels


def _set_threads(cfg: BenchConfig) -> None:
    """Decide ``cfg.threads`` (applied by :func:`.run.run_bench` for its run only, so resolving a
    config changes no global state). Left at None on a CPU run, it becomes 1 when the machine is
    already busy (1-minute load average >= usable cores): there an OpenMP barrier of a
    multi-threaded op waits for a descheduled thread -- on the 2-core development machine at
    load 9, even tiny convolutions and batch norms then took ~60 ms each (a scheduler time
    slice) -- so timings would measure the scheduler, not the kernels. The reason goes to
    ``cfg.threads_reason`` and the run's notes."""
    import os

    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ValueError(f"threads: expected a positive integer, got {cfg.threads}")
        cfg.threads_reason = "set by --threads"
        return
    cfg.threads = torch.get_num_threads()
    cfg.threads_reason = "torch default"
    if cfg.device != "cpu" or not hasattr(os, "getloadavg"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0]
    if load >= cores and cfg.threads > 1:
        cfg.threads = 1
        cfg.threads_reason = (f"machine busy (load average {load:.1f} on {cores} cores): 1 thread, so OpenMP "
                              "barriers do not wait on descheduled threads; override with --threads")


_deadline: dict[int, float] = {}


def start_clock(cfg: BenchConfig) -> None:
    """Start the run's time budget (if any)."""
    import time

    if cfg.time_budget_s:
        _deadline[id(cfg)] = time.perf_counter() + cfg.time_budget_s


def over_budget(cfg: BenchConfig, what: str) -> bool:
    """True (and ``what`` recorded in ``cfg.skipped``) once the time budget is spent."""
    import time

    end = _deadline.get(id(cfg))
    if end is None or time.perf_counter() < end:
        return False
    cfg.skipped.append({"what": what, "why": f"--time-budget {cfg.time_budget_s:g} s spent"})
    return True


def warmup_for(cfg: BenchConfig, level: str) -> int:
    """Untimed warm-up calls: on a CPU a whole model gets at least 3 unless ``--warmup`` was
    given (as ``benchmarks/cpu_ab.py`` does): in a fresh process (``--processes``) the first
    forwards also fault in the heap and pack weights, which is not what a running model costs."""
    if cfg.device == "cpu" and level == "model" and not cfg.warmup_explicit:
        return max(cfg.warmup, 3)
    return cfg.warmup


def repeats_for(cfg: BenchConfig, level: str) -> int:
    """Timed repeats: layers and blocks are cheap, so they get more repeats than whole models on a CPU."""
    if cfg.device == "cpu" and level != "model":
        return max(cfg.repeats, 5)
    return cfg.repeats
