"""Per-layer benchmark: one ResNet convolution with its BN (+ shortcut) (+ ReLU).

Inference compares ``fused_resnet.functional.conv_bn_act`` (one fused op, per backend) with
eager ``F.conv2d`` + ``F.batch_norm`` (eval) + add + ReLU on NCHW and channels_last tensors,
cuDNN's own fused conv-(add-)ReLU with BN folded into the weights (CUDA), ``torch.compile``
of the eager code, and the convolution alone (``conv_only``: ``F.conv2d`` on channels_last,
cuDNN on a GPU), whose TFLOP/s every other row is compared with (``pct_conv_only_tflops``).

Training (forward + backward, gradients of x, the conv weight, BN gamma and beta) compares the
fused chain ``conv_stats`` -> ``bn_finalize`` -> ``bn_add_act`` with eager conv -> batch-stat BN
-> add -> ReLU.

Every row carries its error against :mod:`fused_resnet.reference` run in float64 on the same
inputs: inference compares the output; training the larger of the output's and the input
gradient's errors (each ``max|got - ref| / max|ref|``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from fused_resnet import backends, functional, reference

from . import timing
from ._util import CL, make_row, rand, rel_err
from .config import BenchConfig, compile_at, over_budget, repeats_for
from .shapes import ConvShape

EPS = 1e-5


class LayerData:
    """Inputs of one layer: ``n_buffers`` rotating x / residual / grad buffers and BN params."""

    def __init__(self, shape: ConvShape, batch: int, cfg: BenchConfig, gen: torch.Generator):
        dev, dt = cfg.torch_device, cfg.torch_dtype
        s = shape
        self.shape = s
        p, q = s.out_hw
        nb = cfg.n_buffers
        self.xs = [rand((batch, s.c, s.h, s.w), dev, dt, gen) for _ in range(nb)]
        self.res = [rand((batch, s.k, p, q), dev, dt, gen) if s.residual else None for _ in range(nb)]
        fan_in = (s.c // s.groups) * s.r * s.s
        self.w = (rand((s.k, s.c // s.groups, s.r, s.s), dev, torch.float32, gen) * fan_in ** -0.5).to(dt)
        self.w = self.w.contiguous(memory_format=CL)
        self.gamma = (torch.rand(s.k, generator=gen) * 0.5 + 0.5).to(dev)
        self.beta = (torch.randn(s.k, generator=gen) * 0.1).to(dev)
        self.mean = (torch.randn(s.k, generator=gen) * 0.1).to(dev)
        self.var = (torch.rand(s.k, generator=gen) * 0.5 + 0.75).to(dev)
        self.scale, self.shift = reference.fold_bn(self.mean, self.var, self.gamma, self.beta, EPS)
        # BN parameters in the activation dtype, cast once, as a model moved to that dtype holds them
        self.bn_dt = [t.to(dt) for t in (self.mean, self.var, self.gamma, self.beta)]
        self.conv = dict(stride=s.stride, padding=s.padding, dilation=s.dilation, groups=s.groups)

    def nchw(self):
        return ([x.contiguous() for x in self.xs], [None if r is None else r.contiguous() for r in self.res],
                self.w.contiguous())


# ----------------------------------------------------------------------------- inference


def _eager_infer(x, w, r, d: LayerData):
    s = d.shape
    y = TF.conv2d(x, w, None, s.stride, s.padding, s.dilation, s.groups)
    mean, var, gamma, beta = d.bn_dt
    y = TF.batch_norm(y, mean, var, gamma, beta, False, 0.0, EPS)
    if r is not None:
        y = y + r
    return torch.relu(y) if s.relu else y


def inference_variants(d: LayerData, cfg: BenchConfig) -> dict:
    """``{variant: (fn(i) -> output, impl, skip_reason)}`` for one layer in inference."""
    s, dt, nb = d.shape, cfg.torch_dtype, cfg.n_buffers
    out: dict = {}
    for b in cfg.backends:
        why = backends.unsupported_reason(b, cfg.torch_device, dt, "conv_bn_act")
        out[f"fused:{b}"] = (
            (lambda i, b=b: functional.conv_bn_act(d.xs[i % nb], d.w, d.scale, d.shift, d.res[i % nb],
                                                   relu=s.relu, backend=b, **d.conv)),
            f"fused_resnet.functional.conv_bn_act(backend={b!r})", why)
    xs_n, rs_n, w_n = d.nchw()
    if "eager" in cfg.baselines:
        out["eager"] = (lambda i: _eager_infer(xs_n[i % nb], w_n, rs_n[i % nb], d),
                        "F.conv2d + F.batch_norm + add + relu (NCHW)", None)
    if "eager_cl" in cfg.baselines:
        out["eager_cl"] = (lambda i: _eager_infer(d.xs[i % nb], d.w, d.res[i % nb], d),
                           "F.conv2d + F.batch_norm + add + relu (channels_last)", None)
    if "conv_only" in cfg.baselines:
        out["conv_only"] = (lambda i: TF.conv2d(d.xs[i % nb], d.w, None, s.stride, s.padding, s.dilation, s.groups),
                            "F.conv2d alone (channels_last; cuDNN on CUDA) -- no BN, add or ReLU", None)
    if "cudnn_fused" in cfg.baselines:
        why = None
        if cfg.device != "cuda":
            why = "cuDNN's fused conv-add-relu needs CUDA"
        elif not s.relu:
            why = "cuDNN's fused ops end in ReLU; this conv (projection shortcut) has none"
        wf = (d.w.float() * d.scale.view(-1, 1, 1, 1)).to(dt).contiguous(memory_format=CL)
        bias = d.shift.to(dt)
        st, pd, dl = [s.stride] * 2, [s.padding] * 2, [s.dilation] * 2
        if s.residual:
            fn = (lambda i: torch.cudnn_convolution_add_relu(d.xs[i % nb], wf, d.res[i % nb], 1.0, bias, st, pd, dl,
                                                             s.groups))
            impl = "torch.cudnn_convolution_add_relu (BN folded into weight/bias)"
        else:
            fn = lambda i: torch.cudnn_convolution_relu(d.xs[i % nb], wf, bias, st, pd, dl, s.groups)
            impl = "torch.cudnn_convolution_relu (BN folded into weight/bias)"
        out["cudnn_fused"] = (fn, impl, why)
    if compile_at(cfg, "layer"):
        compiled = torch.compile(lambda x, r: _eager_infer(x, d.w, r, d), dynamic=False)
        out["compile"] = (lambda i: compiled(d.xs[i % nb], d.res[i % nb]),
                          "torch.compile(eager channels_last)", None)
    return out


def _reference_infer(d: LayerData) -> torch.Tensor:
    f64 = torch.float64
    r = d.res[0]
    return reference.conv_bn_act(d.xs[0].to(f64), d.w.to(f64), d.scale.to(f64), d.shift.to(f64),
                                 None if r is None else r.to(f64), [d.shape.stride] * 2, [d.shape.padding] * 2,
                                 [d.shape.dilation] * 2, d.shape.groups, d.shape.relu)


# ----------------------------------------------------------------------------- training


def training_variants(d: LayerData, cfg: BenchConfig) -> dict:
    """``{variant: (fn(i) -> (y, grads), impl, skip_reason)}``: forward + backward of one layer."""
    s, dt, nb = d.shape, cfg.torch_dtype, cfg.n_buffers
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    p, q = s.out_hw
    gouts = [rand((d.xs[0].shape[0], s.k, p, q), cfg.torch_device, dt, gen) for _ in range(nb)]
    xs = [x.detach().clone().requires_grad_(True) for x in d.xs]
    w = d.w.detach().clone().requires_grad_(True)
    gamma = d.gamma.detach().clone().requires_grad_(True)
    beta = d.beta.detach().clone().requires_grad_(True)
    out: dict = {}

    def fused(i, b):
        x, r = xs[i % nb], d.res[i % nb]
        z, st = functional.conv_stats(x, w, backend=b, **d.conv)
        count = z.shape[0] * z.shape[2] * z.shape[3]
        sc, sh, _, _ = functional.bn_finalize(st, count, gamma, beta, backend=b)
        y = functional.bn_add_act(z, sc, sh, r, relu=s.relu, backend=b)
        return y, torch.autograd.grad(y, (x, w, gamma, beta), gouts[i % nb])

    for b in cfg.backends:
        why = backends.unsupported_reason(b, cfg.torch_device, dt, "conv_stats")
        out[f"fused:{b}"] = (lambda i, b=b: fused(i, b), f"conv_stats + bn_finalize + bn_add_act (backend={b!r})",
                             why)

    # eager BN parameters live in the activation dtype (as in a model moved to that dtype)
    gamma_dt = d.gamma.detach().to(dt).clone().requires_grad_(True)
    beta_dt = d.beta.detach().to(dt).clone().requires_grad_(True)

    def eager(x, wt, r, g):
        y = TF.conv2d(x, wt, None, s.stride, s.padding, s.dilation, s.groups)
        y = TF.batch_norm(y, None, None, gamma_dt, beta_dt, True, 0.0, EPS)
        if r is not None:
            y = y + r
        y = torch.relu(y) if s.relu else y
        return y, torch.autograd.grad(y, (x, wt, gamma_dt, beta_dt), g)

    if "eager" in cfg.baselines:
        xs_n = [x.detach().contiguous().requires_grad_(True) for x in d.xs]
        rs_n = [None if r is None else r.contiguous() for r in d.res]
        w_n = d.w.detach().contiguous().requires_grad_(True)
        gouts_n = [g.contiguous() for g in gouts]
        out["eager"] = (lambda i: eager(xs_n[i % nb], w_n, rs_n[i % nb], gouts_n[i % nb]),
                        "conv2d + batch_norm(training) + add + relu, autograd (NCHW)", None)
    if "eager_cl" in cfg.baselines:
        out["eager_cl"] = (lambda i: eager(xs[i % nb], w, d.res[i % nb], gouts[i % nb]),
                           "conv2d + batch_norm(training) + add + relu, autograd (channels_last)", None)
    if compile_at(cfg, "layer"):
        def fwd(x, wt, r):
            y = TF.conv2d(x, wt, None, s.stride, s.padding, s.dilation, s.groups)
            y = TF.batch_norm(y, None, None, gamma_dt, beta_dt, True, 0.0, EPS)
            if r is not None:
                y = y + r
            return torch.relu(y) if s.relu else y

        cf = torch.compile(fwd, dynamic=False)

        def comp(i):
            x = xs[i % nb]
            y = cf(x, w, d.res[i % nb])
            return y, torch.autograd.grad(y, (x, w, gamma_dt, beta_dt), gouts[i % nb])

        out["compile"] = (comp, "torch.compile(eager channels_last), forward + backward", None)
    return out, gouts


def _reference_train(d: LayerData, gout: torch.Tensor):
    f64 = torch.float64
    s = d.shape
    x = d.xs[0].to(f64).requires_grad_(True)
    w = d.w.to(f64).requires_grad_(True)
    gamma = d.gamma.to(f64).requires_grad_(True)
    beta = d.beta.to(f64).requires_grad_(True)
    z, st = reference.conv_stats(x, w, None, None, False, [s.stride] * 2, [s.padding] * 2, [s.dilation] * 2,
                                 s.groups)
    count = z.shape[0] * z.shape[2] * z.shape[3]
    sc, sh, _, _ = reference.bn_finalize(st, count, gamma, beta, EPS)
    r = d.res[0]
    y = reference.bn_add_act(z, sc, sh, None if r is None else r.to(f64), None, None, s.relu)
    return y, torch.autograd.grad(y, (x, w, gamma, beta), gout.to(f64))


# ----------------------------------------------------------------------------- driver


def bench_layers(cfg: BenchConfig, shapes: list[ConvShape], peaks: dict | None, progress) -> list[dict]:
    """Rows for every (shape, mode, variant). ``progress.step`` is called once per shape and mode."""
    rows: list[dict] = []
    dev = cfg.torch_device
    elem = torch.empty((), dtype=cfg.torch_dtype).element_size()
    reps = repeats_for(cfg, "layer")
    for shape in shapes:
        if over_budget(cfg, f"layers from {shape.name} on"):
            break
        for mode in cfg.modes:
            batch = cfg.layer_batch or (cfg.batch if mode == "inference" else cfg.train_batch)
            if mode == "training":
                batch = max(batch, 2)  # batch statistics need more than one value per channel
            gen = torch.Generator().manual_seed(cfg.seed)
            s = ConvShape(**{**shape.__dict__, "n": batch})
            d = LayerData(s, batch, cfg, gen)
            if mode == "inference":
                variants = inference_variants(d, cfg)
                with torch.no_grad():
                    ref = _reference_infer(d)

                def ref_conv(d=d):
                    with torch.no_grad():
                        return TF.conv2d(d.xs[0].double(), d.w.double(), None, d.shape.stride, d.shape.padding,
                                         d.shape.dilation, d.shape.groups)
                flops, nbytes = s.flops, s.min_bytes(elem)
            else:
                variants, gouts = training_variants(d, cfg)
                ref_y, ref_g = _reference_train(d, gouts[0])
                # forward + dgrad + wgrad: three convolutions' worth of FLOPs
                flops, nbytes = 3 * s.flops, None
            for variant, (fn, impl, why) in variants.items():
                common = dict(batch=batch, flops=flops, min_bytes=nbytes, peaks=peaks, impl=impl)
                if why is not None:
                    rows.append(make_row("layer", mode, s.name, s.label, variant, status="skipped", reason=why,
                                         **common))
                    continue
                try:
                    grad_ctx = torch.no_grad() if mode == "inference" else torch.enable_grad()
                    with grad_ctx:
                        got = fn(0)
                        if mode == "inference":
                            err = rel_err(got, ref_conv() if variant == "conv_only" else ref)
                        else:
                            err = max(rel_err(got[0], ref_y), rel_err(got[1][0], ref_g[0]))
                        t = timing.measure(fn, dev, max(cfg.warmup - 1, 0), reps)  # fn(0) warmed up
                        launches = (timing.count_launches(lambda fn=fn: fn(1), dev) if not (
                            dev.type == "cpu" and variant.startswith("compile")) else timing.NOT_COUNTED_CPU_COMPILED)
                    rows.append(make_row("layer", mode, s.name, s.label, variant, timing=t, launches=launches,
                                         err=err, err_vs="float64 reference", **common))
                except Exception as exc:  # one broken variant must not hide the others' figures
                    rows.append(make_row("layer", mode, s.name, s.label, variant, status="failed",
                                         reason=f"{type(exc).__name__}: {exc}"[:300], **common))
            progress.step(f"{s.name} {mode}")
    return rows

