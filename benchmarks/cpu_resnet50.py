"""Eval-mode ResNet-50 on CPU: torchvision eager channels_last vs the same weights through
``fused_resnet.functional.conv_bn_act`` (backend ``cpu``), interleaved, median of repeats.

Issue #7's CPU target: batch 8, 224x224, float32, 2 threads; fused >= 1.25x torchvision eager
channels_last. Run from the repository root::

    python benchmarks/cpu_resnet50.py                 # torchvision vs fused
    python benchmarks/cpu_resnet50.py --compile       # + torch.compile(freezing=True), slow to build
    python benchmarks/cpu_resnet50.py --unfused       # + the cpu backend without its oneDNN fast path
    python benchmarks/cpu_resnet50.py --floors        # per-conv FLOP / byte floors, then exit
    python benchmarks/cpu_resnet50.py --train         # training step instead (batch 4 by default)
    python benchmarks/cpu_resnet50.py --model         # + fused_resnet.models.resnet50 with eval plans
                                                      #   on, off, and without the oneDNN stem

The fused forward is built here from torchvision's own modules (until ``fused_resnet.models``
lands): BatchNorm folded once with ``fold_bn`` (outside the timed region, as a fused model
caches it), one ``conv_bn_act`` per conv + bn (+ shortcut add) (+ relu); maxpool, avgpool and
fc stay torch. Each repeat times every variant once, in turn, on the same input, so load from
other processes hits them alike; the reported ratio is the ratio of medians.

``--train`` times one training step (forward, ``sum(logits)``, backward; gradients set to None
before each step) of ``fused_resnet.models.resnet50`` in train mode against torchvision's
resnet50 with the same weights, both channels_last, batch 4 unless ``--batch`` is given: the
fused model runs conv_stats / bn_finalize / bn_add_act and their backward on the cpu backend.
Every timing line also gives the process CPU time (``process_time``, all threads), which a
loaded machine inflates much less than wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import torch
import torchvision

# Run from a checkout: the repository root (with the in-place build) comes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fused_resnet import functional as FF  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _conv_args(conv: torch.nn.Conv2d) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


@contextlib.contextmanager
def env_set(env: dict):
    """Environment variables set for the block, restored after it (the kernels read their switches
    per call, so one process can interleave variants)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


class FusedResNet(torch.nn.Module):
    """torchvision ResNet's eval forward through fused conv_bn_act calls (same weights)."""

    def __init__(self, tv: torchvision.models.ResNet, backend: str = "cpu", env: dict | None = None):
        super().__init__()
        self.tv = tv
        self.backend = backend
        self.env = env or {}  # environment variables set around each forward (A/B of kernel switches)
        self.folded = {}
        for name, mod in tv.named_modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                self.folded[name] = tuple(t.detach() for t in FF.fold_bn(mod))

    def _cba(self, x, conv, bn_name, residual=None, relu=True):
        scale, shift = self.folded[bn_name]
        return FF.conv_bn_act(x, conv.weight, scale, shift, residual, relu=relu, backend=self.backend,
                              **_conv_args(conv))

    def forward(self, x):
        with env_set(self.env):
            return self._forward(x)

    def _forward(self, x):
        tv = self.tv
        x = x.contiguous(memory_format=torch.channels_last)
        x = self._cba(x, tv.conv1, "bn1")
        x = tv.maxpool(x)
        for lname in ("layer1", "layer2", "layer3", "layer4"):
            for i, blk in enumerate(getattr(tv, lname)):
                p = f"{lname}.{i}"
                if blk.downsample is not None:
                    idn = self._cba(x, blk.downsample[0], f"{p}.downsample.1", relu=False)
                else:
                    idn = x
                convs = [n for n in ("conv1", "conv2", "conv3") if hasattr(blk, n)]
                out = x
                for j, cname in enumerate(convs):
                    last = j == len(convs) - 1
                    out = self._cba(out, getattr(blk, cname), f"{p}.bn{j + 1}", idn if last else None)
                x = out
        x = tv.avgpool(x)
        return tv.fc(torch.flatten(x, 1))


def floors(model: torchvision.models.ResNet, batch: int, peak_gflops: float, gbps: float) -> None:
    """Per-conv FLOPs and minimum bytes (input + weight + output (+ residual) once, float32)."""
    rows = []

    def hook(mod, inp, out):
        x = inp[0]
        k, cg, r, s = mod.weight.shape
        n, _, p, q = out.shape
        flops = 2 * n * k * p * q * cg * r * s
        nbytes = 4 * (x.numel() + mod.weight.numel() + out.numel())
        rows.append((mod._fr_name, tuple(x.shape), tuple(out.shape), flops, nbytes))

    hs = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod._fr_name = name
            hs.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last))
    for h in hs:
        h.remove()
    tf = sum(r[3] for r in rows)
    tb = sum(r[4] for r in rows)
    print(f"{'conv':28s} {'in':>20s} {'out':>20s} {'GFLOP':>7s} {'MB':>7s} {'t_flop ms':>9s} {'t_byte ms':>9s}")
    for name, i, o, f, b in rows:
        print(f"{name:28s} {str(i):>20s} {str(o):>20s} {f / 1e9:7.3f} {b / 1e6:7.2f} "
              f"{f / peak_gflops / 1e6:9.2f} {b / gbps / 1e6:9.2f}")
    print(f"total: {tf / 1e9:.1f} GFLOP, {tb / 1e6:.0f} MB; floors at {peak_gflops} GFLOP/s and {gbps} GB/s: "
          f"{tf / peak_gflops / 1e6:.0f} ms compute, {tb / gbps / 1e6:.0f} ms memory")


def _report(times: dict, cpu: dict, base_name: str, args, what: str) -> None:
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"CPU: {cpu_model()}, threads {torch.get_num_threads()}, torch {torch.__version__}, load avg {load}, "
          f"torchvision {torchvision.__version__}, batch {args.batch}, float32, channels_last, {what}, "
          f"{args.repeats} interleaved repeats (machine shared with other processes)")
    base = statistics.median(times[base_name])
    for name, ts in times.items():
        med = statistics.median(ts)
        cmed = statistics.median(cpu[name])
        print(f"  {name:18s} median {med * 1e3:8.1f} ms  min {min(ts) * 1e3:8.1f} ms  "
              f"speedup vs {base_name} {base / med:5.2f}x  (cpu time median {cmed * 1e3:8.1f} ms)")


def train_main(args, tv: torchvision.models.ResNet) -> None:
    """Interleaved training steps: torchvision eager channels_last vs fused_resnet.models.resnet50."""
    from fused_resnet import models

    fused = models.resnet50()
    fused.load_state_dict(tv.state_dict())
    fused = fused.to(memory_format=torch.channels_last).train()
    tv = tv.train()
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    variants = {"torchvision_cl": tv, "fused_cpu": fused}

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    times, cpu = _time_interleaved(variants, step, args)
    _report(times, cpu, "torchvision_cl", args, "training step (forward + backward)")


class WithEnv(torch.nn.Module):
    """Runs ``model`` with environment variables set around each forward (per-call switches)."""

    def __init__(self, model: torch.nn.Module, **env: str):
        super().__init__()
        self.model, self.env = model, env

    def forward(self, x):
        with env_set(self.env):
            return self.model(x)


def fused_model(tv: torchvision.models.ResNet) -> torch.nn.Module:
    """``fused_resnet.models.resnet50`` in eval mode with ``tv``'s weights, channels_last."""
    from fused_resnet import models

    m = models.resnet50().eval()
    m.load_state_dict(tv.state_dict())
    return m.to(memory_format=torch.channels_last)


def _time_interleaved(variants: dict, step, args) -> tuple[dict, dict]:
    """``args.warmup`` rounds, then ``args.repeats`` rounds each running ``step(model)`` once per
    variant in turn; returns ({name: wall times}, {name: process CPU times}) in seconds."""
    for _ in range(args.warmup):
        for m in variants.values():
            step(m)
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, m in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step(m)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return times, cpu


def resnet50_eval_cl() -> torchvision.models.ResNet:
    """torchvision's resnet50 in eval mode, channels_last, with non-trivial BN statistics and
    affine parameters (so folding is exercised: fresh models have mean 0, var 1). Uses the global
    RNG: seed it first for the same model in every process."""
    tv = torchvision.models.resnet50().eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return tv.to(memory_format=torch.channels_last)


def compile_freezing(model: torch.nn.Module):
    """``torch.compile`` with Inductor's freezing (weights constant-folded and pre-packed); compiles
    on the first call."""
    import torch._inductor.config as ic

    ic.freezing = True
    return torch.compile(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None, help="default 8 (eval), 4 (--train)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also torch.compile with inductor freezing")
    ap.add_argument("--unfused", action="store_true",
                    help="also the cpu backend with FUSED_RESNET_CPU_ONEDNN=0 (ATen conv + separate epilogue)")
    ap.add_argument("--model", action="store_true",
                    help="also fused_resnet.models.resnet50: eval plans on, off (FUSED_RESNET_FAST_EVAL=0), "
                         "and on without the oneDNN stem")
    ap.add_argument("--floors", action="store_true", help="print per-conv FLOP/byte floors and exit")
    ap.add_argument("--train", action="store_true", help="time a training step instead of eval")
    ap.add_argument("--peak-gflops", type=float, default=150.0, help="assumed fp32 peak for --floors")
    ap.add_argument("--gbps", type=float, default=20.0, help="assumed memory bandwidth for --floors")
    args = ap.parse_args()
    if args.batch is None:
        args.batch = 4 if args.train else 8

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tv = resnet50_eval_cl()
    if args.floors:
        floors(tv, args.batch, args.peak_gflops, args.gbps)
        return
    if args.train:
        train_main(args, tv)
        return

    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    variants = {"torchvision_cl": tv, "fused_cpu": FusedResNet(tv, "cpu")}
    if args.unfused:
        variants["fused_cpu_unfused"] = FusedResNet(tv, "cpu", {"FUSED_RESNET_CPU_ONEDNN": "0"})
    if args.model:
        variants["model_plans"] = WithEnv(fused_model(tv), FUSED_RESNET_FAST_EVAL="1")
        variants["model_no_plans"] = WithEnv(fused_model(tv), FUSED_RESNET_FAST_EVAL="0")
        no_stem = fused_model(tv)
        no_stem._stem_plan = None  # the stem then takes the ordinary path; blocks keep their plans
        variants["model_plans_no_stem"] = WithEnv(no_stem, FUSED_RESNET_FAST_EVAL="1")
    if args.compile:
        t0 = time.perf_counter()
        comp = compile_freezing(tv)
        with torch.no_grad():
            comp(x)
        print(f"torch.compile(freezing=True) first call: {time.perf_counter() - t0:.1f} s")
        variants["compile_freezing"] = comp

    with torch.no_grad():
        ref = tv(x)
        for name, m in variants.items():
            err = (m(x) - ref).abs().max().item()
            print(f"{name}: max |logit diff| vs torchvision = {err:.2e} (logit scale {ref.abs().max().item():.2e})")
        times, cpu = _time_interleaved(variants, lambda m: m(x), args)
    _report(times, cpu, "torchvision_cl", args, "eval")


if __name__ == "__main__":
    main()
