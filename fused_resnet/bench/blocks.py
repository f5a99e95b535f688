"""Per-block benchmark: one residual block of the model (for each stage, its first block, with
the projection shortcut and stride, and its second, with the identity shortcut).

Variants: the fused block (:func:`.fusing.fused_block`, per backend), the torchvision block in
eager mode on NCHW and on channels_last input, and ``torch.compile`` of the channels_last block.
Inference runs the block in ``eval()`` (folded BN: one launch per conv is the claim); training
runs forward + backward (gradients of the input and every parameter) with batch statistics.

Each row's error is against the same block in float64 (``max|got - ref| / max|ref|`` of the output;
in training also of the input gradient, the larger is reported). Launch counts per block call
come from :func:`.timing.count_launches`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fused_resnet import backends

from . import timing
from ._util import CL, backend_env, make_row, rand, rel_err
from .config import BenchConfig, compile_at, over_budget, repeats_for
from .fusing import fused_block
from .shapes import conv_shapes, is_residual_block, module_inputs


def pick_blocks(model: nn.Module) -> list[str]:
    """Names of the first two blocks of every stage (``layer1.0``, ``layer1.1``, ...)."""
    names = [n for n, m in model.named_modules() if is_residual_block(m)]
    out, seen = [], {}
    for n in names:
        stage = n.rsplit(".", 1)[0]
        seen[stage] = seen.get(stage, 0) + 1
        if seen[stage] <= 2:
            out.append(n)
    return out


def _block_label(block: nn.Module, shape: tuple) -> str:
    kind = "Bottleneck" if hasattr(block, "conv3") else "BasicBlock"
    proj = "proj" if block.downsample is not None else "identity"
    return f"{kind} {shape[1]}x{shape[2]}x{shape[3]} {proj}"


def bench_blocks(cfg: BenchConfig, model: nn.Module, peaks: dict | None, progress) -> list[dict]:
    rows: list[dict] = []
    dt = cfg.torch_dtype
    mods = dict(model.named_modules())
    reps = repeats_for(cfg, "block")
    elem = torch.empty((), dtype=dt).element_size()
    for mode in cfg.modes:
        batch = cfg.layer_batch or (cfg.batch if mode == "inference" else cfg.train_batch)
        if mode == "training":
            batch = max(batch, 2)  # batch statistics need more than one value per channel (1x1 late stages)
        in_shapes = module_inputs(model, batch, cfg.size, (type(mods[pick_blocks(model)[0]]),))
        all_convs = conv_shapes(model, batch, cfg.size, distinct=False)
        for name in pick_blocks(model):
            if over_budget(cfg, f"blocks from {name} ({mode}) on"):
                break
            block = mods[name]
            shape = in_shapes.get(name) or module_inputs(model, batch, cfg.size, (type(block),))[name]
            convs = [s for s in all_convs if s.name.startswith(name + ".")]
            flops = sum(s.flops for s in convs) * (1 if mode == "inference" else 3)
            nbytes = sum(s.min_bytes(elem) for s in convs) if mode == "inference" else None
            label = _block_label(block, shape)
            rows += _bench_one(cfg, mode, name, label, block, shape, flops, nbytes, peaks, reps)
            progress.step(f"{name} {mode}")
    return rows


def _bench_one(cfg, mode, name, label, block, shape, flops, nbytes, peaks, reps) -> list[dict]:
    dev, dt, nb = cfg.torch_device, cfg.torch_dtype, cfg.n_buffers
    train = mode == "training"
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    xs = [rand(shape, dev, dt, gen) for _ in range(nb)]
    base = copy.deepcopy(block).train(train)
    # reference: the same block in float64 on the same input
    ref_blk = copy.deepcopy(base).to(device=dev, dtype=torch.float64)
    x64 = xs[0].to(torch.float64).requires_grad_(train)
    with torch.set_grad_enabled(train):
        ref_y = ref_blk(x64)
    gouts = None
    if train:
        gouts = [rand(ref_y.shape, dev, dt, gen) for _ in range(nb)]
        ref_dx = torch.autograd.grad(ref_y, x64, gouts[0].to(torch.float64))[0]
    ref_y = ref_y.detach()

    variants: dict = {}
    for b in cfg.backends:
        why = backends.unsupported_reason(b, dev, dt, "conv_stats" if train else "conv_bn_act")
        try:
            mod, impl = fused_block(base, b)
        except Exception as exc:  # no fused_resnet.nn, or it refuses this block
            mod, impl, why = None, "fused_resnet.nn", why or f"no fused block: {type(exc).__name__}: {exc}"[:200]
        variants[f"fused:{b}"] = (mod, True, impl, why, b)
    if "eager" in cfg.baselines:
        variants["eager"] = (copy.deepcopy(base), False, "torchvision block, eager (NCHW)", None, None)
    if "eager_cl" in cfg.baselines:
        variants["eager_cl"] = (copy.deepcopy(base), True, "torchvision block, eager (channels_last)", None, None)
    if compile_at(cfg, "block"):
        variants["compile"] = ("compile", True, "torch.compile(torchvision block, channels_last)", None, None)

    rows = []
    for variant, (mod, cl, impl, why, b) in variants.items():
        common = dict(batch=shape[0], flops=flops, min_bytes=nbytes, peaks=peaks, impl=impl)
        if why is not None:
            rows.append(make_row("block", mode, name, label, variant, status="skipped", reason=why, **common))
            continue
        try:
            if mod == "compile":
                eager_mod = copy.deepcopy(base).to(device=dev, dtype=dt, memory_format=CL)
                mod = torch.compile(eager_mod)
                params = list(eager_mod.parameters())
            else:
                mod = mod.to(device=dev, dtype=dt)
                if cl:
                    mod = mod.to(memory_format=CL)
                params = list(mod.parameters())
            inputs = [x if cl else x.contiguous() for x in xs]
            if train:
                inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
                gs = [g if cl else g.contiguous() for g in gouts]

                def fn(i, mod=mod, inputs=inputs, gs=gs, params=params):
                    x = inputs[i % nb]
                    y = mod(x)
                    return y, torch.autograd.grad(y, [x] + params, gs[i % nb])
            else:
                def fn(i, mod=mod, inputs=inputs):
                    return mod(inputs[i % nb])
            with backend_env(b), torch.set_grad_enabled(train):
                got = fn(0)
                err = max(rel_err(got[0], ref_y), rel_err(got[1][0], ref_dx)) if train else rel_err(got, ref_y)
                t = timing.measure(fn, dev, max(cfg.warmup - 1, 0), reps)  # fn(0) warmed up
                launches = (timing.count_launches(lambda fn=fn: fn(1), dev) if not (
                            dev.type == "cpu" and variant.startswith("compile")) else timing.NOT_COUNTED_CPU_COMPILED)
            rows.append(make_row("block", mode, name, label, variant, timing=t, launches=launches, err=err,
                                 err_vs="same block in float64", **common))
        except Exception as exc:
            rows.append(make_row("block", mode, name, label, variant, status="failed",
                                 reason=f"{type(exc).__name__}: {exc}"[:300], **common))
    return rows
