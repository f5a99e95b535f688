"""igemm vs cuDNN per ResNet-50 (or ResNeXt) layer shape (CUDA only).

    python benchmarks/igemm_layers.py [--batch 256] [--dtype bfloat16|float16|float32]
                                      [--model resnet50|resnext50_32x4d|resnext101_32x8d]
                                      [--budget 60] [--json PATH]

``--dtype float32`` times the TF32 paths: it sets ``torch.backends.cudnn.allow_tf32 = True`` (the
flag igemm's float32 path follows), so cuDNN runs TF32 too (a like-for-like comparison).
``--model resnext*`` adds the grouped 3x3 layers (igemm runs them as one GEMM per group with a
64-wide N tile however small K/groups is: see csrc/README.md "Groups").

For every distinct convolution of the chosen torchvision model at the given batch (224x224 input),
inference role (BN folded; shortcut add and ReLU where the layer has them), it times:

* ``cudnn_conv``   -- F.conv2d alone on channels_last (the issue's throughput yardstick);
* ``cudnn_eager``  -- F.conv2d + F.batch_norm (eval) + add + relu, eager (the issue's target:
                      a fused conv_bn_act must take <= this);
* ``fused_cudnn``  -- fused_resnet's CUDA conv_bn_act, default path (cuDNN conv + our epilogue);
* ``fused_igemm``  -- the same op with FUSED_RESNET_CUDA_CONV=igemm (one launch, our kernel).

Method: median of triton.testing.do_bench (CUDA-event timing, L2 flushed between calls) when
Triton is importable, else median of CUDA events over warmed-up repeats. Before timing, the
igemm output is compared with the default path (``rel_diff`` = max|igemm - cudnn| / max|cudnn|)
and a profiler check records whether the igemm kernel really launched (``igemm_ran``). Layers
are visited in model order until ``--budget`` seconds have passed; the rest are reported as
not measured. Prints a table and one ``IGEMM_JSON {...}`` line (environment + rows); --json
also writes that record to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

CL = torch.channels_last
ENV = "FUSED_RESNET_CUDA_CONV"


def _timer():
    try:
        from triton.testing import do_bench

        def t(fn):
            return float(do_bench(fn, warmup=10, rep=40, return_mode="median")), "triton.do_bench median"
    except Exception:  # no Triton: CUDA events
        def t(fn):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(20):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return sorted(times)[len(times) // 2], "cuda-events median"
    return t


def _ran_igemm(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any("igemm_kernel" in e.name for e in prof.events())


def _supported(cs, dtype) -> bool:
    """igemm_supported's channel rule (ops_cuda.cpp): channels per group a multiple of the
    16-byte vector (8 elements in 16-bit, 4 in float32 / TF32)."""
    vec = 4 if dtype == torch.float32 else 8
    return (dtype in (torch.float16, torch.bfloat16, torch.float32) and (cs.c // cs.groups) % vec == 0
            and (cs.k // cs.groups) % vec == 0)


def _measure_layer(cs, dtype, timer) -> dict:
    """Times one layer shape four ways (see the module docstring); igemm opted in last."""
    ops = torch.ops.fused_resnet
    p, q = cs.out_hw
    x = torch.randn(cs.n, cs.c, cs.h, cs.w, device="cuda", dtype=dtype).contiguous(memory_format=CL)
    w = (torch.randn(cs.k, cs.c // cs.groups, cs.r, cs.s, device="cuda", dtype=torch.float32)
         * (2.0 / (cs.c // cs.groups * cs.r * cs.s)) ** 0.5).to(dtype).contiguous(memory_format=CL)
    scale = torch.rand(cs.k, device="cuda") + 0.5
    shift = torch.randn(cs.k, device="cuda")
    rm, rv = torch.randn(cs.k, device="cuda"), torch.rand(cs.k, device="cuda") + 0.5
    gamma, beta = torch.randn(cs.k, device="cuda"), torch.randn(cs.k, device="cuda")
    res = (torch.randn(cs.n, cs.k, p, q, device="cuda", dtype=dtype).contiguous(memory_format=CL)
           if cs.residual else None)
    st, pd, dl = [cs.stride] * 2, [cs.padding] * 2, [cs.dilation] * 2

    def cudnn_conv():
        return F.conv2d(x, w, None, st, pd, dl, cs.groups)

    def cudnn_eager():
        y = F.batch_norm(cudnn_conv(), rm, rv, gamma, beta, False, 0.0, 1e-5)
        if res is not None:
            y = y + res
        return torch.relu(y) if cs.relu else y

    def fused():
        return ops.conv_bn_act(x, w, scale, shift, res, st, pd, dl, cs.groups, cs.relu)

    row = {}
    flops = 2.0 * cs.n * p * q * cs.k * (cs.c // cs.groups) * cs.r * cs.s
    os.environ.pop(ENV, None)
    ref = fused().float()
    row["cudnn_conv_ms"], row["method"] = timer(cudnn_conv)
    row["cudnn_eager_ms"], _ = timer(cudnn_eager)
    row["fused_cudnn_ms"], _ = timer(fused)
    os.environ[ENV] = "igemm"
    got = fused().float()
    row["igemm_ran"] = _ran_igemm(fused)
    row["rel_diff"] = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    row["fused_igemm_ms"], _ = timer(fused)
    row["igemm_tflops"] = flops / (row["fused_igemm_ms"] * 1e-3) / 1e12
    row["cudnn_conv_tflops"] = flops / (row["cudnn_conv_ms"] * 1e-3) / 1e12
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="float32 = TF32 on both paths (torch.backends.cudnn.allow_tf32 = True)")
    ap.add_argument("--model", default="resnet50",
                    choices=["resnet50", "resnext50_32x4d", "resnext101_32x8d"])
    ap.add_argument("--budget", type=float, default=60.0, help="seconds; layers after it are skipped")
    ap.add_argument("--json", default=None, help="also write the JSON record here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("igemm_layers: needs a CUDA device; nothing measured")
        return 0

    import torchvision

    import fused_resnet  # noqa: F401  (registers the ops)
    from fused_resnet.bench.env import collect_env
    from fused_resnet.bench.shapes import conv_shapes

    dtype = getattr(torch, args.dtype)
    if dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = True
    timer = _timer()
    t0 = time.monotonic()
    shapes = conv_shapes(getattr(torchvision.models, args.model)(), args.batch, 224)
    rows = []
    old_env = os.environ.get(ENV)
    torch.manual_seed(0)
    try:
        for cs in shapes:
            row = {"layer": cs.name, "n": cs.n, "c": cs.c, "h": cs.h, "w": cs.w, "k": cs.k, "r": cs.r,
                   "s": cs.s, "groups": cs.groups, "stride": cs.stride, "padding": cs.padding, "residual": cs.residual,
                   "relu": cs.relu, "count": cs.count, "igemm_supported": _supported(cs, dtype)}
            rows.append(row)
            if time.monotonic() - t0 > args.budget:
                row["note"] = "not measured (time box)"
                continue
            try:
                row.update(_measure_layer(cs, dtype, timer))
            except Exception as e:  # an unvalidated kernel may fault: keep what was measured
                row["note"] = f"error: {type(e).__name__}: {str(e)[:200]}"
                print(f"igemm_layers: {cs.name}: {row['note']}", file=sys.stderr)
                break  # a CUDA fault poisons the context; stop here
    finally:
        if old_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old_env

    hdr = (f"{'layer':<22}{'shape (c>k rxs /s @hw)':<26}{'cudnn conv':>11}{'+eager bn':>11}"
           f"{'fused cudnn':>12}{'fused igemm':>12}{'igemm TF/s':>11}{'vs conv':>8}{'rel diff':>10}  ran")
    print(f"igemm vs cuDNN, {args.model}, {dtype}{' (TF32)' if dtype == torch.float32 else ''}, "
          f"batch {args.batch}, times in ms "
          f"({torch.cuda.get_device_name(0)})")
    print(hdr)
    for r in rows:
        shape = f"{r['c']}>{r['k']} {r['r']}x{r['s']} /{r['stride']} @{r['h']}" + (
            f" g{r['groups']}" if r["groups"] > 1 else "")
        if "fused_igemm_ms" not in r:
            print(f"{r['layer']:<22}{shape:<26}  {r.get('note', '')}")
            continue
        print(f"{r['layer']:<22}{shape:<26}{r['cudnn_conv_ms']:>11.3f}{r['cudnn_eager_ms']:>11.3f}"
              f"{r['fused_cudnn_ms']:>12.3f}{r['fused_igemm_ms']:>12.3f}{r['igemm_tflops']:>11.1f}"
              f"{r['cudnn_conv_ms'] / r['fused_igemm_ms']:>8.2f}{r['rel_diff']:>10.1e}  "
              f"{'yes' if r['igemm_ran'] else 'NO (fallback)'}")
    record = {"env": collect_env(), "model": args.model, "dtype": str(dtype),
              "tf32": dtype == torch.float32, "batch": args.batch, "rows": rows}
    print("IGEMM_JSON " + json.dumps(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
