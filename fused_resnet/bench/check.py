"""``fused-resnet check``: every usable backend against the reference, op by op and dtype by dtype.

For each device (CPU; CUDA when present), each backend that can run there (``torch`` is the
reference itself and is not checked against itself; ``triton`` on a CPU only under
``TRITON_INTERPRET=1``), each op and each dtype the backend supports, the op runs on fresh random
inputs (never zeros) at a ResNet-like shape with a residual and a strided projection, and the
result is compared with :mod:`fused_resnet.reference` run on float64 copies.

Pass rule (the design's): the error ``max|got - ref| / max|ref|`` must be at most twice the
error of PyTorch itself computing the same thing in the same dtype (the reference run in that
dtype), with a floor per dtype (float64 1e-10, float32 1e-5, float16 2e-3, bfloat16 1.6e-2) so
an exact-by-luck PyTorch result does not make the bar zero. Backward is checked through
``torch.autograd.grad`` of ``conv_bn_act`` and of the training chain.
"""

from __future__ import annotations

import os

import torch

from fused_resnet import backends, functional, reference

from ._util import rand, rel_err

FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CASES = (  # (n, c, h, w, k, r, stride, padding, groups, residual)
    (2, 16, 10, 10, 32, 3, 1, 1, 1, True),
    (2, 24, 9, 9, 40, 1, 2, 0, 1, False),
    (2, 32, 6, 6, 32, 3, 1, 1, 8, True),
)


def _functional_impl(backend):
    def impl(op, *a):
        if op == "conv_bn_act":
            x, w, scale, shift, res, conv = a
            return functional.conv_bn_act(x, w, scale, shift, res, backend=backend, **conv)
        if op == "conv_stats":
            x, w, s, b, _, conv = a
            return functional.conv_stats(x, w, s, b, True, backend=backend, **conv)
        if op == "bn_finalize":
            st, count, g, b = a
            return functional.bn_finalize(st, count, g, b, backend=backend)
        z, sc, sh, r = a
        return functional.bn_add_act(z, sc, sh, r, backend=backend)
    return impl


def _reference_impl(op, *a):
    if op == "conv_bn_act":
        x, w, scale, shift, res, c = a
        return reference.conv_bn_act(x, w, scale, shift, res, [c["stride"]] * 2, [c["padding"]] * 2, [1, 1],
                                     c["groups"], True)
    if op == "conv_stats":
        x, w, s, b, _, c = a
        return reference.conv_stats(x, w, s, b, True, [c["stride"]] * 2, [c["padding"]] * 2, [1, 1], c["groups"])
    if op == "bn_finalize":
        st, count, g, b = a
        return reference.bn_finalize(st, count, g, b, 1e-5)
    z, sc, sh, r = a
    return reference.bn_add_act(z, sc, sh, r, None, None, True)


def _inputs(case, device, dtype, gen):
    n, c, h, w_, k, r, stride, padding, groups, has_res = case
    x = rand((n, c, h, w_), device, dtype, gen)
    w = (rand((k, c // groups, r, r), device, torch.float32, gen) * ((c // groups) * r * r) ** -0.5).to(dtype)
    p = (h + 2 * padding - r) // stride + 1
    res = rand((n, k, p, p), device, dtype, gen) if has_res else None
    acc = reference.acc_dtype(dtype)
    vec = lambda m, lo, hi: (torch.rand(m, generator=gen) * (hi - lo) + lo).to(device=device, dtype=acc)
    scale, shift = vec(k, 0.5, 1.5), vec(k, -0.2, 0.2)
    in_scale, in_shift = vec(c, 0.5, 1.5), vec(c, -0.2, 0.2)
    gamma, beta = vec(k, 0.5, 1.5), vec(k, -0.2, 0.2)
    conv = dict(stride=stride, padding=padding, groups=groups)
    return x, w, scale, shift, res, in_scale, in_shift, gamma, beta, conv


def _cast(t, dtype):
    if t is None:
        return None
    if not t.is_floating_point():
        return t
    if t.dim() == 1:  # per-channel vectors: the accumulation dtype of `dtype`
        return t.to(reference.acc_dtype(dtype))
    return t.to(dtype)


def check_backend(device: str, backend: str, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """Rows ``{device, backend, dtype, op, case, err, torch_err, tol, passed}`` for one backend."""
    dev = torch.device(device)
    rows = []
    impl = _functional_impl(backend)
    for ci, case in enumerate(CASES):
        gen = torch.Generator().manual_seed(seed + ci)
        x, w, scale, shift, res, in_scale, in_shift, gamma, beta, conv = _inputs(case, dev, dtype, gen)
        f64 = torch.float64
        ref = _ops_split(x.to(f64), w.to(f64), _cast(scale, f64), _cast(shift, f64), _cast(in_scale, f64),
                         _cast(in_shift, f64), _cast(res, f64), _cast(gamma, f64), _cast(beta, f64), conv,
                         _reference_impl)
        own = _ops_split(x, w, scale, shift, in_scale, in_shift, res, gamma, beta, conv, _reference_impl)
        got = _ops_split(x, w, scale, shift, in_scale, in_shift, res, gamma, beta, conv, impl)
        for op in ref:
            rows.append(_row(device, backend, dtype, op, ci, got[op], own[op], ref[op]))
        f = _grad_conv_bn_act
        rows.append(_row(device, backend, dtype, "conv_bn_act.backward", ci,
                         f(x, w, scale, shift, res, conv, impl), f(x, w, scale, shift, res, conv, _reference_impl),
                         f(x.to(f64), w.to(f64), _cast(scale, f64), _cast(shift, f64), _cast(res, f64), conv,
                           _reference_impl)))
    return rows


def _ops_split(x, w, scale, shift, in_scale, in_shift, res, gamma, beta, conv, impl):
    out = {"conv_bn_act": impl("conv_bn_act", x, w, scale, shift, res, conv)}
    z, st = impl("conv_stats", x, w, in_scale, in_shift, None, conv)
    out["conv_stats.z"], out["conv_stats.stats"] = z, st[0]
    out["conv_stats.M2"] = st[1]
    count = z.shape[0] * z.shape[2] * z.shape[3]
    sc, sh, _, _ = impl("bn_finalize", st, count, gamma, beta)
    out["bn_finalize"] = torch.cat([sc, sh])
    out["bn_add_act"] = impl("bn_add_act", z, sc, sh, res if res is not None else z)
    return out


def _grad_conv_bn_act(x, w, scale, shift, res, conv, impl):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = impl("conv_bn_act", x, w, scale, shift, res, conv)
    g = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=torch.float64).reshape(y.shape).to(y.dtype)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    return torch.cat([gx.flatten(), gw.flatten()])


def _row(device, backend, dtype, op, case, got, own, ref) -> dict:
    err = rel_err(got, ref)
    torch_err = rel_err(own, ref)
    tol = max(2 * torch_err, FLOORS[dtype])
    return {"device": device, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "op": op,
            "case": case, "err": err, "torch_err": torch_err, "tol": tol, "passed": err <= tol}


def usable(device: str) -> list[tuple[str, list[torch.dtype], dict]]:
    """``[(backend, dtypes it runs, {dtype: why not})]`` for the non-reference backends on ``device``."""
    out = []
    for b in backends.BACKENDS:
        if b == "torch":
            continue
        if b == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        ok, why = [], {}
        for dt in DTYPES:
            reason = backends.unsupported_reason(b, torch.device(device), dt, "conv_bn_act")
            if reason is None:
                if b == "triton" and device == "cpu" and dt == torch.bfloat16:
                    why[dt] = "the Triton interpreter has no bfloat16"
                    continue
                ok.append(dt)
            else:
                why[dt] = reason
        out.append((b, ok, why))
    return out


def run_check(devices: list[str] | None = None, seed: int = 0, progress=None) -> dict:
    """Check every usable backend; returns ``{"rows": [...], "skipped": [...], "passed": bool}``."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, skipped = [], []
    for device in devices:
        for b, dts, why in usable(device):
            for dt, reason in why.items():
                skipped.append({"device": device, "backend": b, "dtype": str(dt).replace("torch.", ""),
                                "why": reason})
            for dt in dts:
                try:
                    rows += check_backend(device, b, dt, seed)
                except Exception as exc:
                    rows.append({"device": device, "backend": b, "dtype": str(dt).replace("torch.", ""),
                                 "op": "(run)", "case": None, "err": None, "torch_err": None, "tol": None,
                                 "passed": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
                if progress:
                    progress(f"{device} {b} {dt}")
    return {"rows": rows, "skipped": skipped, "passed": bool(rows) and all(r["passed"] for r in rows)}


def format_check(result: dict) -> str:
    """One line per (device, backend, dtype, op): the worst case's error against its tolerance."""
    worst: dict = {}
    for r in result["rows"]:
        key = (r["device"], r["backend"], r["dtype"], r["op"])
        cur = worst.get(key)
        if cur is None or not r["passed"] or (cur["passed"] and (r["err"] or 0) > (cur["err"] or 0)):
            worst[key] = r
    lines = [f"{'device':<6} {'backend':<7} {'dtype':<9} {'op':<22} {'error':>9} {'torch err':>9} {'tol':>9}  result"]
    for (dev, b, dt, op), r in worst.items():
        if r["err"] is None:
            lines.append(f"{dev:<6} {b:<7} {dt:<9} {op:<22} {'-':>9} {'-':>9} {'-':>9}  FAIL {r.get('error', '')}")
            continue
        lines.append(f"{dev:<6} {b:<7} {dt:<9} {op:<22} {r['err']:>9.2e} {r['torch_err']:>9.2e} {r['tol']:>9.2e}  "
                     + ("pass" if r["passed"] else "FAIL"))
    seen = set()
    for s in result["skipped"]:
        same = [t for t in result["skipped"] if (t["device"], t["backend"], t["why"]) == (s["device"], s["backend"],
                                                                                          s["why"])]
        key = (s["device"], s["backend"], s["why"])
        if key in seen:
            continue
        seen.add(key)
        dts = ",".join(t["dtype"] for t in same) if len(same) < len(DTYPES) else "all"
        lines.append(f"{s['device']:<6} {s['backend']:<7} {dts:<9} {'(all ops)':<22} skipped: {s['why']}")
    n_fail = sum(not r["passed"] for r in result["rows"])
    lines.append("")
    lines.append(f"{len(result['rows'])} checks, {n_fail} failed: " + ("ALL PASS" if result["passed"] else "FAILURES"))
    if not torch.cuda.is_available():
        lines.append("no CUDA device here: the cuda and triton backends need a GPU to be checked")
    return "\n".join(lines)
