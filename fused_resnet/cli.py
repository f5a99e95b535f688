"""``fused-resnet`` command line: bench, check and info.

* ``fused-resnet bench`` -- fused backends against eager PyTorch (NCHW and channels_last),
  cuDNN's fused conv-add-relu and ``torch.compile``, per layer, per block and per model, in
  inference and training; prints a table, optionally writes JSON/CSV/PNG and a results folder.
  Without a GPU it runs the CPU comparison (and says that GPU figures need a GPU).
* ``fused-resnet check`` -- every usable backend against the reference, per op and dtype;
  exit status 1 if anything fails. The first thing to run on a new machine.
* ``fused-resnet info`` -- Python/torch/triton/CUDA versions, what ``fused_resnet._C`` contains
  (CPU kernels, CUDA kernels and their archs), and which backends can run here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

from fused_resnet._ext import OPS


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> dict:
    import torch

    import fused_resnet
    from fused_resnet import _ext, backends

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "count": torch.cuda.device_count()}
    kernels = {op: [key for key in ("CPU", "CUDA") if _ext.has_kernel(op, key)] for op in OPS}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "fused_resnet": fused_resnet.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "cuda_available": torch.cuda.is_available(),
        "gpu": gpu,
        "extension": {
            "loaded": _ext.available(),
            "problem": _ext.problem,
            "built_against_torch": _ext.build_info.get("torch_version"),
            "cuda_kernels": bool(_ext.build_info.get("cuda")),
            "openmp": _ext.build_info.get("openmp"),
            "cpu_threads": torch.get_num_threads(),
            "cuda_archs": _ext.build_info.get("cuda_archs") or [],
            "build_note": _ext.build_info.get("reason"),
            "kernels": kernels,
        },
        "backends": {
            dev: {b: (why or "usable") for b, why in backends.usable_backends(dev).items()}
            for dev in devices
        },
    }


def _print_info(info: dict) -> None:
    ext = info["extension"]
    archs = ext["cuda_archs"]
    rows = [
        ("fused_resnet", info["fused_resnet"]),
        ("python", info["python"]),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'}, cuDNN {info['cudnn'] or 'none'})"),
        ("triton", info["triton"] or "not installed"),
        ("GPU", f"{info['gpu']['name']} (sm_{info['gpu']['capability'].replace('.', '')})"
         if info["gpu"] else "none visible"),
        ("_C", "loaded" if ext["loaded"] else f"NOT loaded: {ext['problem']}"),
    ]
    if ext["loaded"]:
        rows.append(("_C contents", "CPU kernels" + (
            f" + CUDA kernels (sm_{', sm_'.join(archs)})" if ext["cuda_kernels"] else " only")))
        rows.append(("_C built with", f"torch {ext['built_against_torch']}; {ext['build_note'] or ''}"))
        rows.append(("CPU kernel threads", f"OpenMP, {ext['cpu_threads']} (torch.get_num_threads())"
                     if ext["openmp"] else "1 (built without OpenMP)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("\nbackends:")
    for dev, table in info["backends"].items():
        for b, status in table.items():
            print(f"  {dev:<5} {b:<7} {status}")


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _add_bench_parser(sub) -> None:
    from fused_resnet.bench.config import BASELINES, DTYPES, LEVELS, MODES

    p = sub.add_parser("bench", help="fused vs cuDNN / eager / torch.compile, per layer, block and model",
                       description="Benchmark the fused backends against eager PyTorch (NCHW and channels_last), "
                                   "cuDNN's fused conv-add-relu and torch.compile. Defaults: resnet50, bfloat16 "
                                   "batch 64 on a GPU; float32 batch 8 (training 4) on a CPU.")
    p.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch", type=int, help="inference batch (default 64 on cuda, 8 on cpu)")
    p.add_argument("--train-batch", type=int, help="training batch (default: --batch on cuda, 4 on cpu)")
    p.add_argument("--train-precision", choices=("amp", "cast"),
                   help="whole-model training in bfloat16/float16: amp = float32 parameters under torch.autocast "
                        "(default), cast = the model cast to --dtype")
    p.add_argument("--layer-batch", type=int, help="batch of the per-layer/per-block runs (default: as the model)")
    p.add_argument("--size", type=int, default=224, help="input height = width (default 224)")
    p.add_argument("--mode", default="inference,training",
                   help=f"comma-separated subset of {','.join(MODES)} (default both)")
    p.add_argument("--levels", default="layer,block,model",
                   help=f"comma-separated subset of {','.join(LEVELS)} (default all)")
    p.add_argument("--backends", help="fused backends, comma-separated (default: every usable one but torch)")
    p.add_argument("--baselines", help=f"comma-separated subset of {','.join(BASELINES)} (default: all that apply "
                                       "on this device; on a CPU torch.compile runs at model level only)")
    p.add_argument("--compile-levels", default="layer,block,model",
                   help="levels at which the compile baseline runs (default all; compiling every layer shape is slow)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no new measurement after this many seconds; what is left is listed as skipped")
    p.add_argument("--repeats", type=int, help="timed repeats (default 50 on cuda, 3 on cpu)")
    p.add_argument("--warmup", type=int, help="untimed warm-up calls (default 10 on cuda, 1 on cpu)")
    p.add_argument("--buffers", type=int, help="input buffers rotated between calls (default 3 on cuda, 2 on cpu)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="time whole-model inference without CUDA graphs")
    p.add_argument("--no-peaks", action="store_true", help="skip the on-the-spot TFLOP/s and GB/s peak measurement")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, or 1 when the machine is busy)")
    p.add_argument("--processes", type=int, metavar="ROUNDS",
                   help="whole-model timing in ROUNDS rounds of fresh processes, variants alternating, median of "
                        "the processes' medians (default 3 on cpu, where one process's heap state moves a model's "
                        "time by 10-30 %%; 0 on cuda; 0 = everything in this process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON ('-' = stdout, table to stderr)")
    p.add_argument("--csv", metavar="PATH", help="write the result rows as CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: per-layer speedup and per-model throughput")
    p.add_argument("--results", metavar="DIR", help="also save JSON + markdown + PNG named after the machine in DIR "
                                                   "(e.g. benchmarks/results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _bench(args) -> int:
    from fused_resnet.bench import BenchConfig, report, run_bench

    cfg = BenchConfig(
        model=args.model, device=args.device, dtype=args.dtype, batch=args.batch, train_batch=args.train_batch,
        layer_batch=args.layer_batch, train_precision=args.train_precision,
        size=args.size, modes=_csv_list(args.mode), levels=_csv_list(args.levels),
        backends=_csv_list(args.backends) if args.backends else None,
        baselines=_csv_list(args.baselines) if args.baselines else None,
        warmup=args.warmup, repeats=args.repeats, n_buffers=args.buffers, cuda_graphs=not args.no_cuda_graphs,
        peaks=not args.no_peaks, progress=not args.no_progress, seed=args.seed,
        compile_levels=_csv_list(args.compile_levels), time_budget_s=args.time_budget, threads=args.threads,
        processes=args.processes,
    )
    try:
        result = run_bench(cfg, argv=["fused-resnet"] + list(args.argv))
    except ValueError as exc:
        print(f"fused-resnet bench: {exc}", file=sys.stderr)
        return 2
    table = report.format_table(result)
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2, default=str)
        print()
    elif args.json:
        report.write_json(result, args.json)
    if args.csv:
        report.write_csv(result, args.csv)
    if args.plot and not report.write_plot(result, args.plot):
        print("--plot: matplotlib is not installed (pip install matplotlib); no PNG written", file=sys.stderr)
    if args.results:
        paths = report.save_results(result, args.results)
        print("saved: " + ", ".join(paths.values()), file=sys.stderr)
    return 0


def _check(args) -> int:
    from fused_resnet.bench import check

    devices = [args.device] if args.device else None
    if args.device == "cuda" and not __import__("torch").cuda.is_available():
        print("fused-resnet check: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    result = check.run_check(devices, seed=args.seed)
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=str)
        print()
    else:
        print(check.format_check(result))
    return 0 if result["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-resnet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, compiled kernels and usable backends")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_bench_parser(sub)
    p_check = sub.add_parser("check", help="every usable backend against the reference, per op and dtype")
    p_check.add_argument("--device", choices=("cpu", "cuda"), help="only this device (default: every one present)")
    p_check.add_argument("--seed", type=int, default=0)
    p_check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "bench":
        return _bench(args)
    if args.command == "check":
        return _check(args)
    if args.command == "info":
        info = collect_info()
        if args.json:
            json.dump(info, sys.stdout, indent=2)
            print()
        else:
            _print_info(info)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
