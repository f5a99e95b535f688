"""Output of a benchmark run: the terminal table, JSON, CSV, a PNG plot and the results folder.

The JSON is the complete record: ``env`` (machine + versions + command + time), ``config``,
``peaks`` (measured on the spot), ``skipped`` (what was left out and why), ``notes`` and
``rows`` (one per level/mode/name/variant, every field of :func:`._util.make_row`). CSV holds the
rows only; the table and the plot are views of the rows.
"""

from __future__ import annotations

import csv
import json
import os
import re

from .env import machine_label

ROW_FIELDS = ["level", "mode", "name", "label", "variant", "status", "median_ms", "p20_ms", "p80_ms", "repeats",
              "timing_method", "batch", "images_per_s", "flops", "tflops", "pct_peak_tflops", "min_bytes", "gbps",
              "pct_peak_gbps", "launches", "launch_unit", "max_rel_err", "err_vs", "peak_mem_mib",
              "speedup_vs_eager", "speedup_vs_eager_cl", "pct_conv_only_tflops", "impl", "reason"]


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(result: dict) -> str:
    """A readable plain-text table, one section per level and mode."""
    lines = []
    env = result["env"]
    cfg = result["config"]
    lines.append(f"machine: {machine_label(env)}; torch {env['versions']['torch']}, "
                 f"triton {env['versions']['triton'] or 'none'}; {cfg['device']} {cfg['dtype']}")
    if result.get("peaks"):
        p = result["peaks"]
        lines.append(f"measured peaks: {p['tflops']:.2f} TFLOP/s ({p['tflops_method']}, {p['tflops_dtype']}), "
                     f"{p['gbps']:.1f} GB/s ({p['gbps_method']})")
    header = (f"{'name':<24} {'variant':<12} {'median ms':>10} {'p20-p80 ms':>17} {'img/s':>9} {'TFLOP/s':>8} "
              f"{'GB/s':>7} {'launch':>6} {'rel err':>8} {'speedup':>7} {'vs cl':>6} {'%conv':>6} {'mem MiB':>8}")
    for level in ("layer", "block", "model"):
        for mode in ("inference", "training"):
            rows = [r for r in result["rows"] if r["level"] == level and r["mode"] == mode]
            if not rows:
                continue
            lines.append("")
            lines.append(f"== {level} / {mode} " + "=" * max(0, len(header) - len(level) - len(mode) - 7))
            lines.append(header)
            last = None
            for r in rows:
                name = r["name"] if r["name"] != last else ""
                if name:
                    lines.append(f"{r['name']}  [{r['label']}]" if level != "model" else f"{r['label']}")
                last = r["name"]
                if r["status"] != "ok":
                    lines.append(f"  {'':<22} {r['variant']:<12} {r['status']}: {r['reason']}")
                    continue
                spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
                ips = _f(r["images_per_s"], ".1f")
                lines.append(
                    f"  {'':<22} {r['variant']:<12} {r['median_ms']:>10.3f} {spread:>17} {ips:>9}"
                    f" {_f(r['tflops'], '.2f'):>8} {_f(r['gbps'], '.1f'):>7} {_f(r['launches'], 'd'):>6}"
                    f" {_f(r['max_rel_err'], '.1e'):>8} {_f(r['speedup_vs_eager'], '.2f'):>7}"
                    f" {_f(r.get('speedup_vs_eager_cl'), '.2f'):>6} {_f(r.get('pct_conv_only_tflops'), '.0f'):>6}"
                    f" {_f(r['peak_mem_mib'], '.0f'):>8}")
    if result.get("skipped"):
        lines.append("")
        lines.append("skipped:")
        for s in result["skipped"]:
            lines.append(f"  {s['what']}: {s['why']}")
    for n in result.get("notes", []):
        lines.append(f"note: {n}")
    units = {r["launch_unit"] for r in result["rows"] if r.get("launch_unit")}
    if units:
        lines.append("launch = " + ", ".join(sorted(units)) + " per call (torch.profiler); rel err = "
                     "max|got - ref| / max|ref| against float64; speedup = eager NCHW median / this median; "
                     "vs cl = eager channels_last median / this median; %conv = TFLOP/s as % of conv_only's "
                     "(the convolution alone)")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")


def write_csv(result: dict, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow(r)


def write_plot(result: dict, path: str) -> bool:
    """PNG with per-layer speedup over eager NCHW (inference and training) and per-model
    throughput (images/s) for every variant. Returns False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    panels = []
    for mode in ("inference", "training"):
        if any(r["level"] == "layer" and r["mode"] == mode for r in ok):
            panels.append(("layer", mode))
    for mode in ("inference", "training"):
        if any(r["level"] == "model" and r["mode"] == mode for r in ok):
            panels.append(("model", mode))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for ax, (level, mode) in zip(axes[:, 0], panels, strict=True):
        rows = [r for r in ok if r["level"] == level and r["mode"] == mode]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        names = list(dict.fromkeys(r["name"] for r in rows))
        width = 0.8 / max(1, len(variants))
        for j, v in enumerate(variants):
            vals = []
            for n in names:
                r = next((r for r in rows if r["name"] == n and r["variant"] == v), None)
                if r is None:
                    vals.append(0.0)
                elif level == "layer":
                    vals.append(r["speedup_vs_eager"] or 0.0)
                else:
                    vals.append(r["images_per_s"] or 0.0)
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=v)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=60 if level == "layer" else 0, ha="right" if level == "layer" else "center",
                           fontsize=7)
        if level == "layer":
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_ylabel("speedup vs eager NCHW")
        else:
            ax.set_ylabel("images/s")
        ax.set_title(f"{level} / {mode}", fontsize=9)
        ax.legend(fontsize=7, ncol=min(6, len(variants)))
    env, cfg = result["env"], result["config"]
    fig.suptitle(f"fused_resnet bench: {cfg['model']} {cfg['dtype']} on {machine_label(env)} "
                 f"(torch {env['versions']['torch']}, {env['timestamp_utc']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_markdown(result: dict, path: str) -> None:
    env, cfg = result["env"], result["config"]
    v = env["versions"]
    gpu = env.get("gpu")
    lines = [
        f"# fused_resnet bench: {cfg['model']}, {cfg['dtype']}, {cfg['device']}",
        "",
        f"- machine: {machine_label(env)}" + (f", driver {gpu['driver']}, sm_{gpu['capability'].replace('.', '')}"
                                               if gpu else ""),
        f"- CPU: {env['cpu']['model']} ({env['cpu']['usable_cores']} usable cores, {env['cpu']['torch_threads']} "
        "torch threads)",
        f"- versions: torch {v['torch']} (CUDA {v['torch_cuda']}, cuDNN {v['cudnn']}), triton {v['triton']}, "
        f"torchvision {v['torchvision']}, fused_resnet {v['fused_resnet']} (git {v.get('fused_resnet_git') or 'n/a'})",
        f"- batch {cfg['batch']} (training {cfg['train_batch']}), input {cfg['size']}x{cfg['size']}, "
        f"warm-up {cfg['warmup']}, repeats {cfg['repeats']}",
        f"- command: `{env['command']}`",
        f"- time: {env['timestamp_utc']}",
        "",
        "```",
        format_table(result),
        "```",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()[:40]


def save_results(result: dict, folder: str) -> dict[str, str]:
    """Write ``<time>_<machine>_<model>_<dtype>.{json,md,png}`` into ``folder`` (created if
    needed); the machine name is part of every file name and inside every file."""
    os.makedirs(folder, exist_ok=True)
    env, cfg = result["env"], result["config"]
    stamp = env["timestamp_utc"].replace(":", "").replace("-", "")
    base = os.path.join(folder, f"{stamp}_{_slug(machine_label(env))}_{cfg['model']}_{cfg['dtype']}")
    paths = {"json": base + ".json", "md": base + ".md"}
    write_json(result, paths["json"])
    write_markdown(result, paths["md"])
    if write_plot(result, base + ".png"):
        paths["png"] = base + ".png"
    return paths


def format_summary(result: dict) -> str:
    """A short table: whole-model rows in full, and per (level, mode, variant) the geometric
    mean speedup over eager NCHW across layers / blocks, the worst error, the launch range, and
    the geometric means of ``speedup_vs_eager_cl`` and ``pct_conv_only_tflops``."""
    import math

    ok = [r for r in result["rows"] if r["status"] == "ok"]
    lines = [f"{'level':<6} {'mode':<10} {'variant':<12} {'img/s | geomean speedup':>24} {'worst rel err':>13} "
             f"{'launches':>9} {'gm vs cl':>8} {'gm %conv':>8}"]
    for r in ok:
        if r["level"] == "model":
            lines.append(f"{'model':<6} {r['mode']:<10} {r['variant']:<12} {r['images_per_s']:>15.1f} img/s "
                         f"{_f(r['max_rel_err'], '.1e'):>13} {_f(r['launches'], 'd'):>9}")

    def gmean(vals):
        vals = [v for v in vals if v]
        return math.exp(sum(math.log(x) for x in vals) / len(vals)) if vals else None

    for level in ("layer", "block"):
        for mode in ("inference", "training"):
            sel = [r for r in ok if r["level"] == level and r["mode"] == mode]
            for v in dict.fromkeys(r["variant"] for r in sel):
                rs = [r for r in sel if r["variant"] == v]
                gm = gmean([r["speedup_vs_eager"] for r in rs])
                gm_cl = gmean([r.get("speedup_vs_eager_cl") for r in rs])
                gm_conv = gmean([r.get("pct_conv_only_tflops") for r in rs])
                errs = [r["max_rel_err"] for r in rs if r["max_rel_err"] is not None]
                la = [r["launches"] for r in rs if r["launches"] is not None]
                lr = f"{min(la)}-{max(la)}" if la else "-"
                lines.append(f"{level:<6} {mode:<10} {v:<12} {_f(gm, '.2f'):>19} x{len(rs):>3} "
                             f"{_f(max(errs) if errs else None, '.1e'):>13} {lr:>9} {_f(gm_cl, '.2f'):>8} "
                             f"{_f(gm_conv, '.0f'):>8}")
    failed = [r for r in result["rows"] if r["status"] == "failed"]
    if failed:
        lines.append(f"{len(failed)} FAILED rows, e.g. {failed[0]['level']} {failed[0]['name']} "
                     f"{failed[0]['variant']}: {failed[0]['reason'][:100]}")
    return "\n".join(lines)
