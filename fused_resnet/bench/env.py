"""The machine and software a benchmark ran on.

Every result carries this record (the design's rule: never a figure without the machine it
came from): CPU model and core counts, GPU name / capability / memory / driver, and the
versions of Python, torch (+ its CUDA and cuDNN), triton, torchvision and fused_resnet (and the
git commit of the source checkout, when there is one), what
``fused_resnet._C`` was built with, the command line and a UTC timestamp.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys

import torch


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _git_commit() -> str | None:
    """The source checkout's commit (``+dirty`` with local changes), None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def collect_env(argv: list[str] | None = None) -> dict:
    """A JSON-ready record of this machine, its software and the command being run."""
    import fused_resnet
    from fused_resnet import _ext

    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count,
            "driver": _driver_version(),
            "count": torch.cuda.device_count(),
        }
    argv = sys.argv if argv is None else argv
    return {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in argv),
        "hostname_hint": platform.node().split(".")[0][:32],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": {
            "model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "gpu": gpu,
        "versions": {
            "fused_resnet": fused_resnet.__version__,
            "fused_resnet_git": _git_commit(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "triton": _version("triton"),
            "torchvision": _version("torchvision"),
        },
        "extension": {
            "loaded": _ext.available(),
            "cuda_kernels": bool(_ext.build_info.get("cuda")),
            "cuda_archs": _ext.build_info.get("cuda_archs") or [],
            "built_against_torch": _ext.build_info.get("torch_version"),
            "problem": _ext.problem,
        },
    }


def machine_label(env: dict) -> str:
    """A short human label of the machine: the GPU name, else the CPU model and core count."""
    if env.get("gpu"):
        return env["gpu"]["name"]
    cpu = env["cpu"]
    return f"{cpu['model']} ({cpu['usable_cores']} cores)"
