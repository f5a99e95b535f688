"""One model-level measurement in a fresh process: ``python -m fused_resnet.bench._isolated SPEC``.

Started by :func:`fused_resnet.bench.models._run_in_processes` (``fused-resnet bench
--processes N``). ``SPEC`` is a JSON file: the resolved :class:`~.config.BenchConfig` as a dict,
the ``mode`` and ``variant`` to time, the path of the parent's float64 reference (``torch.save``),
the parent's ``peaks``, whether to count launches, and the ``out`` path, where this process writes
``{"row": <result row>, "timing": <Timing with its samples>}``. The model, weights and inputs
are rebuilt from the config's seed exactly as the parent builds them, so every process times the
same computation.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys

import torch

from .config import BenchConfig
from .models import _Prep, _run_variant, _variants, build_torchvision

_TUPLES = ("modes", "levels", "backends", "baselines", "compile_levels")


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    fields = {k: (tuple(v) if k in _TUPLES and v is not None else v) for k, v in spec["cfg"].items()}
    cfg = BenchConfig(**fields)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.device == "cuda":
        torch.backends.cudnn.benchmark = True
    mode, variant = spec["mode"], spec["variant"]
    prep = _Prep(cfg, build_torchvision(cfg.model, cfg.seed), mode)
    ref = torch.load(spec["ref"])
    ref_logits = ref["logits"].to(cfg.torch_device)
    ref_gw = None if ref["gw"] is None else ref["gw"].to(cfg.torch_device)
    mod, cl, impl, why, b, graphs = _variants(cfg, prep, only=variant)[variant]
    if why is not None:  # the parent found it runnable: a difference here is an error
        raise RuntimeError(f"{variant}: not runnable in the child process: {why}")
    if mod not in ("compile", "compile_max"):
        prep.base = None  # only the compile variants copy it while running; hold one model, as a user would
        gc.collect()
    common = dict(batch=prep.batch, flops=prep.flops, min_bytes=prep.nbytes, peaks=spec["peaks"], impl=impl)
    row, t = _run_variant(cfg, mode, variant, mod, cl, b, graphs, prep, ref_logits, ref_gw, common,
                          count_launches=spec["count_launches"])
    with open(spec["out"], "w") as f:
        json.dump({"row": row, "timing": dataclasses.asdict(t)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
