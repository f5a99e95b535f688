"""Small helpers shared by the benchmark levels: inputs, errors, BN randomisation, progress."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
from torch import nn

CL = torch.channels_last


def rand(shape, device, dtype, generator: torch.Generator, channels_last: bool = True) -> torch.Tensor:
    """Standard-normal data (never zeros), made in float32 then cast, optionally channels_last."""
    t = torch.randn(*shape, generator=generator, device="cpu").to(device=device, dtype=dtype)
    return t.contiguous(memory_format=CL) if channels_last and t.dim() == 4 else t


def randomize_bn(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine parameters, so folding is
    exercised (a fresh BN is the identity map, which would hide a wrong scale/shift)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                k = m.num_features
                m.running_mean.copy_(torch.randn(k, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(k, generator=generator) * 0.5 + 0.75)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(k, generator=generator) * 0.5 + 0.5)
                    m.bias.copy_(torch.randn(k, generator=generator) * 0.1)
    return model


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got - ref| / max|ref|`` computed in float64 (ref's scale, so one number reads the
    same for every layer); ``inf`` for a NaN/inf anywhere in ``got``."""
    g = got.detach().to(torch.float64)
    r = ref.detach().to(device=g.device, dtype=torch.float64)
    if not torch.isfinite(g).all():
        return float("inf")
    denom = r.abs().max().item() if r.numel() else 0.0
    diff = (g - r).abs().max().item() if r.numel() else 0.0
    return diff / denom if denom > 0 else diff


@contextlib.contextmanager
def backend_env(name: str | None) -> Iterator[None]:
    """Set ``FUSED_RESNET_BACKEND`` for the duration (how a fused module is pointed at a backend)."""
    old = os.environ.get("FUSED_RESNET_BACKEND")
    if name is not None:
        os.environ["FUSED_RESNET_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FUSED_RESNET_BACKEND", None)
        else:
            os.environ["FUSED_RESNET_BACKEND"] = old


class Progress:
    """tqdm when it is installed and wanted, else one plain line per step on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.enabled = enabled
        self.desc = desc
        self.total = total
        self.n = 0
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def step(self, what: str = "") -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(what[:40], refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.desc} {self.n}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def make_row(level: str, mode: str, name: str, label: str, variant: str, *, timing=None, batch: int | None = None,
             flops: float | None = None, min_bytes: float | None = None, peaks: dict | None = None,
             launches: tuple | None = None, err: float | None = None, err_vs: str = "",
             impl: str = "", status: str = "ok", reason: str = "", peak_mem_mib: float | None = None,
             extra: dict | None = None) -> dict:
    """One result row, the same fields at every level (missing figures are ``None``).

    ``tflops`` / ``gbps`` are achieved rates (``flops`` / ``min_bytes`` over the median time);
    ``pct_peak_*`` compare them with the peaks measured at the start of the run.
    """
    r = {
        "level": level, "mode": mode, "name": name, "label": label, "variant": variant, "impl": impl,
        "status": status, "reason": reason,
        "median_ms": None, "p20_ms": None, "p80_ms": None, "repeats": None, "timing_method": None,
        "batch": batch, "images_per_s": None, "flops": flops, "tflops": None, "pct_peak_tflops": None,
        "min_bytes": min_bytes, "gbps": None, "pct_peak_gbps": None,
        "launches": None, "launch_unit": None, "max_rel_err": err, "err_vs": err_vs,
        "peak_mem_mib": peak_mem_mib, "speedup_vs_eager": None, "speedup_vs_eager_cl": None,
        "pct_conv_only_tflops": None,
    }
    if timing is not None:
        set_timing(r, timing, peaks)
    if launches is not None:
        r["launches"], r["launch_unit"] = launches
    if extra:
        r.update(extra)
    return r


def set_timing(r: dict, timing, peaks: dict | None) -> dict:
    """Fill (or replace) a row's timing and the rates derived from it (its ``batch``, ``flops``
    and ``min_bytes`` over ``timing.median_ms``)."""
    t = timing.median_ms * 1e-3
    r.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, repeats=timing.repeats,
             timing_method=timing.method, images_per_s=None, tflops=None, pct_peak_tflops=None, gbps=None,
             pct_peak_gbps=None)
    if r.get("batch"):
        r["images_per_s"] = r["batch"] / t
    if r.get("flops"):
        r["tflops"] = r["flops"] / t / 1e12
        if peaks and peaks.get("tflops"):
            r["pct_peak_tflops"] = 100 * r["tflops"] / peaks["tflops"]
    if r.get("min_bytes"):
        r["gbps"] = r["min_bytes"] / t / 1e9
        if peaks and peaks.get("gbps"):
            r["pct_peak_gbps"] = 100 * r["gbps"] / peaks["gbps"]
    return r


def add_speedups(rows: list[dict]) -> None:
    """Fill the comparisons within each (level, mode, name, batch):

    * ``speedup_vs_eager`` = eager NCHW median / this row's median;
    * ``speedup_vs_eager_cl`` = eager channels_last median / this row's median -- on a GPU that
      baseline is cuDNN's conv followed by separate eager BN (+ add) + ReLU, so >= 1 means the
      fused op takes at most that time (issue #4's per-layer target);
    * ``pct_conv_only_tflops`` = this row's TFLOP/s as a percentage of the ``conv_only`` row's
      (the convolution alone, cuDNN on a GPU): both count the convolution's FLOPs only, so this
      is conv_only's median / this median x 100.
    """
    def key(r):
        return r["level"], r["mode"], r["name"], r.get("batch")

    def medians(variant):
        return {key(r): r["median_ms"] for r in rows if r["variant"] == variant and r["median_ms"]}

    eager, eager_cl, conv = medians("eager"), medians("eager_cl"), medians("conv_only")
    for r in rows:
        t = r["median_ms"]
        if not t:
            continue
        k = key(r)
        if eager.get(k):
            r["speedup_vs_eager"] = eager[k] / t
        if eager_cl.get(k):
            r["speedup_vs_eager_cl"] = eager_cl[k] / t
        if conv.get(k) and r.get("flops"):
            r["pct_conv_only_tflops"] = 100 * conv[k] / t
