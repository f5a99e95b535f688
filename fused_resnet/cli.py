"""``fused-resnet`` command line.

``fused-resnet info`` prints what this installation can do: Python/torch/triton/CUDA versions,
what ``fused_resnet._C`` contains (CPU kernels, CUDA kernels and their archs), and which
backends can run here. ``--json`` prints the same as JSON.

The benchmark (``fused-resnet bench``) and the self-check (``fused-resnet check``) are not
implemented yet; until they land, ``info`` is the main job.
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
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("\nbackends:")
    for dev, table in info["backends"].items():
        for b, status in table.items():
            print(f"  {dev:<5} {b:<7} {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-resnet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, compiled kernels and usable backends")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
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
