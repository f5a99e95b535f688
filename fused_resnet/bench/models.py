"""Whole-model benchmark: the fused model against torchvision's, inference and training.

The eager baselines are ``torchvision.models.<name>()`` (random weights, BatchNorm given random
running statistics and affine parameters); the fused model carries the same weights
(:func:`.fusing.fused_model`). Variants: fused per backend, eager NCHW, eager channels_last,
``torch.compile`` (default mode) and, on CUDA inference, ``torch.compile(mode="max-autotune")``
with inductor's ``freezing`` (weights treated as constants: BN folded by the compiler).

Training precision (``BenchConfig.train_precision``): in bfloat16/float16 the default is AMP,
float32 parameters and input under ``torch.autocast(dtype)`` on every side (fused, eager,
compile), the loss in float32; the row's ``impl`` says "AMP". ``cast`` trains the model cast to
the dtype instead.

Timing: on CUDA, inference of the fused and eager variants and of ``compile`` is replayed from
CUDA graphs (one per input buffer; ``max-autotune`` already runs under CUDA graphs); if
capture fails the row says so and eager launches are timed instead. Training is a step of
forward, cross-entropy loss on random labels and backward (no optimizer step); peak memory
is ``torch.cuda.max_memory_allocated`` during one such step (CUDA only).

On a CPU (``BenchConfig.processes``, ``--processes``; default 3 rounds there, 0 on CUDA) each
variant is timed in fresh processes instead (:mod:`._isolated`), one per variant per round with
the variants alternating, and reported as the median of the processes' medians: a model's CPU
time follows its process's heap state (whether large fresh outputs fault their pages in), which
made one-process figures of the same code differ by up to 30 %.

Errors: logits (and in training the gradient of the first conv's weight) against the
torchvision model in float64 on the same input, ``max|got - ref| / max|ref|``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as TF
from torch import nn

from fused_resnet import backends

from . import timing
from ._util import CL, backend_env, make_row, rand, randomize_bn, rel_err, set_timing
from .config import BenchConfig, compile_at, over_budget, warmup_for
from .fusing import fused_model
from .shapes import conv_shapes, model_flops


def build_torchvision(name: str, seed: int) -> nn.Module:
    import torchvision

    try:
        ctor = getattr(torchvision.models, name)
    except AttributeError:
        raise ValueError(f"model: torchvision.models has no {name!r} (try resnet18/34/50/101/152, "
                         "resnext50_32x4d, wide_resnet50_2)") from None
    torch.manual_seed(seed)
    return randomize_bn(ctor(weights=None), torch.Generator().manual_seed(seed))


def _first_conv_weight(model: nn.Module) -> torch.Tensor:
    return next(m.weight for m in model.modules() if isinstance(m, nn.Conv2d))


def bench_models(cfg: BenchConfig, tv: nn.Module, peaks: dict | None, progress) -> list[dict]:
    rows: list[dict] = []
    for mode in cfg.modes:
        rows += _bench_mode(cfg, tv, mode, peaks, progress)
    return rows


class _Prep:
    """What every variant of one mode shares: inputs, labels, the base model and its figures."""

    def __init__(self, cfg, tv, mode):
        dev, dt, nb = cfg.torch_device, cfg.torch_dtype, cfg.n_buffers
        self.train = train = mode == "training"
        self.batch = batch = cfg.train_batch if train else cfg.batch
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.xs = [rand((batch, 3, cfg.size, cfg.size), dev, dt, gen) for _ in range(nb)]
        self.labels = [torch.randint(0, 1000, (batch,), generator=gen).to(dev) for _ in range(nb)]
        self.base = base = copy.deepcopy(tv).train(train)
        self.flops = model_flops(base, batch, cfg.size) * (3 if train else 1)
        elem = torch.empty((), dtype=dt).element_size()
        self.nbytes = None if train else sum(s.min_bytes(elem) * s.count for s in conv_shapes(base, batch, cfg.size))
        self.label = f"{cfg.model} {cfg.size}x{cfg.size}"


def _reference(cfg, prep: _Prep):
    """float64 logits (and first-conv weight gradient in training) on buffer 0."""
    ref = copy.deepcopy(prep.base).to(device=cfg.torch_device, dtype=torch.float64)
    with torch.set_grad_enabled(prep.train):
        out = ref(prep.xs[0].to(torch.float64))
        ref_logits = out.detach()
        ref_gw = None
        if prep.train:
            TF.cross_entropy(out, prep.labels[0]).backward()
            ref_gw = _first_conv_weight(ref).grad.detach()
    return ref_logits, ref_gw


def _variants(cfg, prep: _Prep, only: str | None = None) -> dict:
    """``{variant: (module or "compile"/"compile_max", channels_last, impl, why-not or None,
    backend, graphs)}`` in the order the rows are reported; with ``only``, just that variant is
    built (a timing process holds no other model: they would change its heap)."""
    dev, dt, train, base, name = cfg.torch_device, cfg.torch_dtype, prep.train, prep.base, cfg.model
    variants: dict = {}
    for b in cfg.backends:
        if only is not None and only != f"fused:{b}":
            continue
        why = backends.unsupported_reason(b, dev, dt, "conv_stats" if train else "conv_bn_act")
        mod, impl = None, "fused model"
        if why is None:
            try:
                mod, impl = fused_model(name, base, b)
            except Exception as exc:
                why = f"no fused model: {type(exc).__name__}: {exc}"[:200]
        variants[f"fused:{b}"] = (mod, True, impl, why, b, "graph")
    if only is not None and only.startswith("fused:"):
        return variants
    if "eager" in cfg.baselines and only in (None, "eager"):
        variants["eager"] = (copy.deepcopy(base), False, f"torchvision.models.{name}, eager (NCHW)", None, None,
                             "graph")
    if "eager_cl" in cfg.baselines and only in (None, "eager_cl"):
        variants["eager_cl"] = (copy.deepcopy(base), True, f"torchvision.models.{name}, eager (channels_last)",
                                None, None, "graph")
    if compile_at(cfg, "model"):
        variants["compile"] = ("compile", True, f"torch.compile(torchvision.models.{name}, channels_last)",
                               None, None, "graph")
    if "compile_max" in cfg.baselines:
        why = None
        if train:
            why = "max-autotune with freezing is an inference configuration"
        elif cfg.device != "cuda":
            why = "max-autotune tunes GPU kernels; GPU figures need a GPU"
        variants["compile_max"] = ("compile_max", True, "torch.compile(mode='max-autotune') + inductor freezing",
                                   why, None, "own")
    return variants


def _bench_mode(cfg, tv, mode, peaks, progress) -> list[dict]:
    prep = _Prep(cfg, tv, mode)
    ref_logits, ref_gw = _reference(cfg, prep)
    variants = _variants(cfg, prep)
    names = list(variants)  # report order
    common = dict(batch=prep.batch, flops=prep.flops, min_bytes=prep.nbytes, peaks=peaks)
    rows: dict[str, dict] = {}
    runnable = []
    for variant, (_mod, _cl, impl, why, _b, _graphs) in variants.items():
        if why is None and over_budget(cfg, f"model {mode} {variant}"):
            why = "time budget spent"
        if why is not None:
            rows[variant] = make_row("model", mode, cfg.model, prep.label, variant, status="skipped", reason=why,
                                     impl=impl, **common)
            progress.step(f"{variant} {mode} (skipped)")
        else:
            runnable.append(variant)
    if cfg.processes:
        variants.clear()  # the children build their own; free these copies first
        rows.update(_run_in_processes(cfg, mode, prep, runnable, ref_logits, ref_gw, peaks, progress))
    else:
        for variant in runnable:
            mod, cl, impl, why, b, graphs = variants[variant]
            try:
                rows[variant] = _run_variant(cfg, mode, variant, mod, cl, b, graphs, prep, ref_logits, ref_gw,
                                             dict(common, impl=impl))[0]
            except Exception as exc:
                rows[variant] = make_row("model", mode, cfg.model, prep.label, variant, status="failed",
                                         reason=f"{type(exc).__name__}: {exc}"[:300], impl=impl, **common)
            progress.step(f"{variant} {mode}")
    return [rows[v] for v in names]


def _run_in_processes(cfg, mode, prep, runnable, ref_logits, ref_gw, peaks, progress) -> dict[str, dict]:
    """Time each variant in ``cfg.processes`` rounds of fresh processes, alternating the variants
    within a round (``python -m fused_resnet.bench._isolated``; see :class:`.config.BenchConfig`)."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys
    import tempfile

    results: dict[str, list] = {v: [] for v in runnable}
    failed: dict[str, dict] = {}
    common = dict(batch=prep.batch, flops=prep.flops, min_bytes=prep.nbytes, peaks=peaks)
    cfg_d = dataclasses.asdict(cfg)
    cfg_d.pop("skipped")
    # `python -m` puts the child's working directory first on sys.path: run it from the folder that
    # holds this process's fused_resnet, so it imports the same (built) package. From a source
    # checkout after a non-editable `pip install .` it would otherwise import the checkout's copy,
    # which has no _C. Every path handed to the child is absolute.
    import fused_resnet

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fused_resnet.__file__)))
    with tempfile.TemporaryDirectory(prefix="fused_resnet_bench_") as tmp:
        ref_path = os.path.join(tmp, "ref.pt")
        torch.save({"logits": ref_logits.cpu(), "gw": None if ref_gw is None else ref_gw.cpu()}, ref_path)
        for rnd in range(cfg.processes):
            for v in runnable:
                if v in failed or over_budget(cfg, f"model {mode} {v}, process round {rnd + 1}"):
                    continue
                spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
                if os.path.exists(out_path):
                    os.remove(out_path)
                with open(spec_path, "w") as f:
                    json.dump({"cfg": cfg_d, "mode": mode, "variant": v, "ref": ref_path, "peaks": peaks,
                               "out": out_path, "count_launches": rnd == 0}, f)
                proc = subprocess.run([sys.executable, "-m", "fused_resnet.bench._isolated", spec_path],
                                      capture_output=True, text=True, cwd=package_root)
                if proc.returncode != 0 or not os.path.exists(out_path):
                    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                    failed[v] = make_row("model", mode, cfg.model, prep.label, v, status="failed",
                                         reason=f"process exited with {proc.returncode}: {tail}"[:300], **common)
                    continue
                with open(out_path) as f:
                    res = json.load(f)
                if res["row"]["status"] != "ok":
                    failed[v] = res["row"]
                else:
                    results[v].append(res)
    rows = {}
    for v in runnable:
        if v in failed:
            rows[v] = failed[v]
        elif not results[v]:
            rows[v] = make_row("model", mode, cfg.model, prep.label, v, status="skipped",
                               reason="time budget spent", **common)
        else:
            per = [timing.Timing(**r["timing"]) for r in results[v]]
            row = results[v][0]["row"]  # the first round's errors and launch count
            set_timing(row, timing.combine_processes(per), peaks)
            row["process_medians_ms"] = [t.median_ms for t in per]
            rows[v] = row
        progress.step(f"{v} {mode}")
    return rows


def _run_variant(cfg, mode, variant, mod, cl, b, graphs, prep: _Prep, ref_logits, ref_gw, common,
                 count_launches: bool = True):
    """Measure one variant in this process: ``(row, timing)``."""
    dev, dt, nb = cfg.torch_device, cfg.torch_dtype, cfg.n_buffers
    name, label, base, xs, labels = cfg.model, prep.label, prep.base, prep.xs, prep.labels
    train = mode == "training"
    notes = []
    amp = train and cfg.train_precision == "amp"
    if amp:
        notes.append(f"AMP: float32 parameters under torch.autocast({cfg.dtype})")
        dt = torch.float32  # the parameters' and the input's dtype; autocast casts to cfg's
    if mod in ("compile", "compile_max"):
        eager_mod = copy.deepcopy(base).to(device=dev, dtype=dt, memory_format=CL)
        if mod == "compile":
            model = torch.compile(eager_mod)
        else:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # must hold at first call, when compilation happens
            model = torch.compile(eager_mod, mode="max-autotune")
        params_of = eager_mod
    else:
        model = mod.to(device=dev, dtype=dt)
        if cl:
            model = model.to(memory_format=CL)
        params_of = model
    inputs = [(x if cl else x.contiguous()).to(dt) for x in xs]
    w0 = _first_conv_weight(params_of)

    if train:
        def fn(i):
            params_of.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=cfg.torch_dtype, enabled=amp):
                out = model(inputs[i % nb])
            TF.cross_entropy(out.float(), labels[i % nb]).backward()
            return out
    else:
        def fn(i):
            return model(inputs[i % nb])

    with backend_env(b), torch.set_grad_enabled(train):
        try:
            out = fn(0)
            err = rel_err(out, ref_logits)
            errs = {"err_logits": err}
            if train:
                errs["err_first_conv_grad"] = rel_err(w0.grad, ref_gw)
                err = max(err, errs["err_first_conv_grad"])
            launches = None
            timed = fn
            if dev.type == "cuda" and not train and graphs == "graph" and cfg.cuda_graphs:
                try:
                    timed = timing.cuda_graph_callable(fn, nb)
                    notes.append("CUDA graphs")
                except Exception as exc:
                    torch.cuda.synchronize()
                    notes.append(f"CUDA graph capture failed ({type(exc).__name__}); eager launches timed")
            peak = None
            if dev.type == "cuda" and train:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn(1)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**20
            # the error call fn(0) was the first warm-up call of an uncaptured variant
            warm = warmup_for(cfg, "model")
            t = timing.measure(timed, dev, warm - (timed is fn and warm > 0), cfg.repeats)
            if count_launches and (variant.startswith("fused") or variant in ("eager", "eager_cl")):
                launches = timing.count_launches(lambda: fn(1), dev)
        finally:
            if mod == "compile_max":
                import torch._inductor.config as inductor_config

                inductor_config.freezing = False
    common = dict(common)
    if notes:
        common["impl"] = common["impl"] + " [" + "; ".join(notes) + "]"
    return make_row("model", mode, name, label, variant, timing=t, launches=launches, err=err,
                    err_vs=f"torchvision {name} in float64", peak_mem_mib=peak, extra=errs, **common), t
