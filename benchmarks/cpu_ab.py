"""A/B of an environment switch on CPU, one model per process, alternating processes.

On a shared 2-core machine the run-to-run noise between processes is larger than the effects of
most kernel switches, and a single process that interleaves several models changes the heap
layout each of them sees (page-fault counts depend on it). So each side of the comparison runs in
its own fresh process, A and B alternate, and every process reports the median of its timed
iterations after a warm-up::

    python benchmarks/cpu_ab.py --env FUSED_RESNET_CPU_AVX2=0 --mode train --pairs 4
    python benchmarks/cpu_ab.py --env FUSED_RESNET_CPU_ONEDNN=0 --mode eval --pairs 6

A = the current environment, B = the current environment plus ``--env``. ``eval``: the fused
ResNet-50 of ``cpu_resnet50.py`` (batch 8 by default); ``train``: ``fused_resnet.models.resnet50``
with the same weights, training steps (batch 4). Prints each pair, the median of the per-process medians and in how
many pairs B was faster, plus minor page faults per iteration.

``--variants`` compares whole eval models instead, each in its own process, rotating through them
for ``--rounds`` rounds (same weights, batch 8, ``torch.no_grad()``), and prints every variant's
median of process medians and its ratio to the first one::

    python benchmarks/cpu_ab.py --variants eager,model,model:FUSED_RESNET_FAST_EVAL=0,compile --rounds 5

``eager``: torchvision channels_last; ``model``: ``fused_resnet.models.resnet50`` (eval plans and
the CPU fast paths as shipped); ``bench``: the functional-API ResNet of ``cpu_resnet50.py``;
``compile``: torchvision under ``torch.compile`` with Inductor freezing (compiled in the warm-up,
which is excluded). Every variant gets the same channels_last input (``--nchw-input``: NCHW).
``NAME:VAR=VALUE[:VAR=VALUE]`` runs a variant with extra environment.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> None:
    import torch

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from cpu_resnet50 import FusedResNet, resnet50_eval_cl

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tv = resnet50_eval_cl()
    if args.model:
        model = tv
        if args.model == "model":
            import fused_resnet.models

            model = fused_resnet.models.resnet50().eval()
            model.load_state_dict(tv.state_dict())
            model = model.to(memory_format=torch.channels_last)
        elif args.model == "bench":
            model = FusedResNet(tv)
        elif args.model == "compile":
            from cpu_resnet50 import compile_freezing

            model = compile_freezing(tv)
        x = torch.randn(args.batch or 8, 3, 224, 224)
        if not args.nchw_input:
            x = x.contiguous(memory_format=torch.channels_last)

        def step():
            with torch.no_grad():
                model(x)
    elif args.mode == "eval":
        model = FusedResNet(tv)
        x = torch.randn(args.batch or 8, 3, 224, 224).contiguous(memory_format=torch.channels_last)

        def step():
            with torch.no_grad():
                model(x)
    else:
        import fused_resnet.models

        model = fused_resnet.models.resnet50()
        model.load_state_dict(tv.state_dict())
        model = model.to(memory_format=torch.channels_last).train()
        x = torch.randn(args.batch or 4, 3, 224, 224).contiguous(memory_format=torch.channels_last)

        def step():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

    times, faults = [], []
    for i in range(args.warmup + args.iters):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(f"RESULT {statistics.median(times) * 1e3:.1f} {statistics.median(faults):.0f}", flush=True)


def run_one(args, extra_env: dict, model: str = "") -> tuple[float, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", args.mode, "--threads",
           str(args.threads), "--warmup", str(args.warmup), "--iters", str(args.iters)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if model:
        cmd += ["--model", model] + (["--nchw-input"] if args.nchw_input else [])
    out = subprocess.run(cmd, env={**os.environ, **extra_env}, capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    ms, flt = line.split()[1:]
    return float(ms), float(flt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE set for side B (repeatable)")
    ap.add_argument("--mode", choices=("eval", "train"), default="eval")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--variants", default="", help="comma-separated eval models (see the docstring)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--nchw-input", action="store_true",
                    help="--variants: feed NCHW images (default: channels_last, eager's best case)")
    ap.add_argument("--model", default="", choices=("", "eager", "model", "bench", "compile"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.variants:
        variants(args)
        return
    env_b = dict(kv.split("=", 1) for kv in args.env)
    a, b = [], []
    for i in range(args.pairs):
        a.append(run_one(args, {}))
        b.append(run_one(args, env_b))
        print(f"pair {i + 1}: A {a[-1][0]:8.1f} ms ({a[-1][1]:6.0f} faults)   "
              f"B {b[-1][0]:8.1f} ms ({b[-1][1]:6.0f} faults)", flush=True)
    wins = sum(tb < ta for (ta, _), (tb, _) in zip(a, b, strict=True))
    ma, mb = statistics.median(t for t, _ in a), statistics.median(t for t, _ in b)
    print(f"{args.mode}, {args.threads} threads, B = {env_b}: median of process medians A {ma:.1f} ms, "
          f"B {mb:.1f} ms (B/A {mb / ma:.3f}); B faster in {wins} of {args.pairs} pairs")


def variants(args) -> None:
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    specs = []
    for name in names:
        model, *env = name.split(":")
        specs.append((name, model, dict(kv.split("=", 1) for kv in env)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        row = []
        for name, model, env in specs:
            ms, flt = run_one(args, env, model)
            times[name].append(ms)
            row.append(f"{name} {ms:.1f}")
        print(f"round {r + 1}: " + ", ".join(row), flush=True)
    base = statistics.median(times[names[0]])
    print(f"eval, batch {args.batch or 8}, {args.threads} threads, {args.rounds} rounds "
          f"(median of {args.iters} forwards per process after {args.warmup} warm-ups):")
    for name in names:
        med = statistics.median(times[name])
        print(f"  {name:40s} {med:8.1f} ms  {base / med:.3f}x {names[0]}  "
              f"(processes: {min(times[name]):.1f}-{max(times[name]):.1f} ms)")


if __name__ == "__main__":
    main()
