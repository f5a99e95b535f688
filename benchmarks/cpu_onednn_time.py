"""oneDNN's own execution time per ResNet-50 eval forward, one model per process.

Runs one variant (``fused``: the cpu backend through ``cpu_resnet50.FusedResNet``; ``model``:
``fused_resnet.models.resnet50`` with its eval plans and oneDNN stem; ``compile``:
``torch.compile`` with Inductor freezing; ``eager``: torchvision channels_last) in this process,
warms it up, then times ``--forwards`` forwards with ``torch.backends.mkldnn.verbose`` on and sums
the ``exec`` lines oneDNN prints per primitive kind. Comparing the variants in separate, fresh
processes separates "the same oneDNN kernels run slower" from "time outside oneDNN"::

    for v in eager fused compile; do python benchmarks/cpu_onednn_time.py $v; done
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", choices=("eager", "fused", "model", "compile"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--forwards", type=int, default=5)
    args = ap.parse_args()

    import torch

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from cpu_resnet50 import FusedResNet, compile_freezing, fused_model, resnet50_eval_cl

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tv = resnet50_eval_cl()
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    model = {"fused": FusedResNet, "model": fused_model, "compile": compile_freezing}.get(args.variant, lambda m: m)(tv)
    with torch.no_grad():
        for _ in range(4):
            model(x)
        # oneDNN prints from C to fd 1: send fd 1 to a file while timing.
        sys.stdout.flush()
        saved = os.dup(1)
        with tempfile.TemporaryFile(mode="w+b") as log:
            os.dup2(log.fileno(), 1)
            try:
                t0 = time.perf_counter()
                with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                    for _ in range(args.forwards):
                        model(x)
                wall = (time.perf_counter() - t0) / args.forwards
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)
                os.close(saved)
            log.seek(0)
            text = io.TextIOWrapper(log, encoding="utf-8", errors="replace").read()
    per_kind = collections.Counter()
    calls = collections.Counter()
    for line in text.splitlines():
        f = line.split(",")
        if len(f) > 4 and f[0].startswith("onednn_verbose") and "exec" in f:
            i = f.index("exec")
            kind = f[i + 2] if len(f) > i + 2 else "?"
            try:
                per_kind[kind] += float(f[-1])
                calls[kind] += 1
            except ValueError:
                pass
    total = sum(per_kind.values()) / args.forwards
    print(f"{args.variant}: wall {wall * 1e3:.1f} ms/forward (verbose on), oneDNN exec {total:.1f} ms/forward, "
          f"outside oneDNN {wall * 1e3 - total:.1f} ms")
    for kind, ms in per_kind.most_common():
        print(f"  {kind:14s} {ms / args.forwards:8.1f} ms/forward  {calls[kind] // args.forwards} calls")


if __name__ == "__main__":
    main()
