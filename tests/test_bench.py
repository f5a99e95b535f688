"""The benchmark engine (fused_resnet.bench) piece by piece, at sizes a 2-core CPU runs quickly.

Expected values come from outside the code under test: torchvision's published operation count
for ResNet-50/18, hand-computed byte counts and quantiles, the profiler's view of a known op
sequence, and a deliberately broken backend that `check` must catch.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as TF
import torchvision

from fused_resnet import _ext, functional
from fused_resnet.bench import check, config, report, shapes, timing
from fused_resnet.bench._util import Progress, rel_err

requires_c = pytest.mark.skipif(not _ext.available(), reason="fused_resnet._C not loaded")


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name, weights", [("resnet50", "ResNet50_Weights"), ("resnet18", "ResNet18_Weights")])
def test_model_flops_match_torchvision_published_ops(name, weights):
    model = getattr(torchvision.models, name)()
    published_gmacs = getattr(torchvision.models, weights).IMAGENET1K_V1.meta["_ops"]
    # torchvision counts multiply-adds (conv + linear), we count 2 FLOPs per multiply-add
    assert shapes.model_flops(model, 1, 224) / 2e9 == pytest.approx(published_gmacs, rel=0.01)


def test_resnet50_conv_shapes_and_roles():
    model = torchvision.models.resnet50()
    distinct = shapes.conv_shapes(model, 8, 224)
    every = shapes.conv_shapes(model, 8, 224, distinct=False)
    assert len(every) == 53 == sum(s.count for s in distinct)  # 1 stem + 16 blocks x 3 + 4 projections
    assert len({s.key() for s in distinct}) == len(distinct)
    by_name = {s.name: s for s in every}
    stem = by_name["conv1"]
    assert (stem.n, stem.c, stem.h, stem.k, stem.r, stem.stride, stem.padding) == (8, 3, 224, 64, 7, 2, 3)
    assert stem.out_hw == (112, 112) and stem.relu and not stem.residual
    assert by_name["layer1.0.conv3"].residual and by_name["layer1.0.conv3"].relu
    assert not by_name["layer2.0.downsample.0"].relu and by_name["layer2.0.downsample.0"].stride == 2
    assert not by_name["layer3.2.conv1"].residual
    assert by_name["layer4.2.conv2"].out_hw == (7, 7)


def test_flops_and_min_bytes_by_hand():
    s = shapes.ConvShape("x", n=2, c=64, h=56, w=56, k=256, r=1, s=1, stride=1, padding=0, dilation=1, groups=1,
                         residual=True, relu=True)
    assert s.flops == 2 * 2 * 256 * 56 * 56 * 64
    x, y, w = 2 * 64 * 56 * 56, 2 * 256 * 56 * 56, 256 * 64
    assert s.min_bytes(2) == 2 * (x + w + 2 * y) + 8 * 256  # bf16 x, w, y, residual + fp32 scale/shift
    g = shapes.ConvShape("g", 1, 128, 7, 7, 128, 3, 3, 1, 1, 1, 32, False, True)
    assert g.flops == 2 * 128 * 49 * 4 * 9


# ----------------------------------------------------------------------------- timing


def test_combine_processes_is_the_median_of_process_medians():
    a = timing.summarize([10.0, 11.0, 30.0], "perf_counter")  # median 11
    b = timing.summarize([20.0, 21.0, 22.0], "perf_counter")  # median 21
    c = timing.summarize([12.0, 13.0], "perf_counter")  # median 12.5
    t = timing.combine_processes([a, b, c])
    assert t.median_ms == 12.5 and t.repeats == 8
    assert t.p20_ms == timing.summarize(a.samples + b.samples + c.samples, "x").p20_ms
    assert "median of 3 fresh processes' medians" in t.method
    assert "samples" not in t.as_dict()


def test_summarize_quantiles():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0], "x")
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.repeats) == (3.0, 1.8, 4.2, 5)


def test_measure_calls_every_index_once():
    seen = []
    t = timing.measure(seen.append, torch.device("cpu"), warmup=2, repeats=4)
    assert seen == list(range(6)) and t.repeats == 4 and t.median_ms >= 0
    with pytest.raises(ValueError, match="repeats"):
        timing.measure(seen.append, torch.device("cpu"), warmup=0, repeats=0)


@requires_c
def test_count_launches_fused_vs_eager_on_cpu():
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3)
    sc, sh = torch.rand(8) + 0.5, torch.randn(8)
    n_fused, unit = timing.count_launches(
        lambda: functional.conv_bn_act(x, w, sc, sh, x, padding=1, backend="cpu"), torch.device("cpu"))
    assert (n_fused, unit) == (1, "top-level ops")
    mean, var = torch.randn(8), torch.rand(8) + 0.5

    def eager():
        y = TF.batch_norm(TF.conv2d(x, w, padding=1), mean, var, sc, sh, False, 0.0, 1e-5)
        return torch.relu(y + x)

    assert timing.count_launches(eager, torch.device("cpu"))[0] == 4


def test_peaks_are_positive_and_plausible():
    p = timing.measure_peaks(torch.device("cpu"), torch.float32, quick=True)
    assert 0 < p["tflops"] < 100 and 0 < p["gbps"] < 10_000
    assert "torch.mm" in p["tflops_method"]


def test_rel_err():
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert rel_err(ref + torch.tensor([0.0, 0.4, 0.0]), ref) == pytest.approx(0.1)
    assert rel_err(torch.tensor([1.0, float("nan"), 2.0]), ref) == math.inf


def test_progress_plain_fallback(capsys):
    p = Progress(2, "demo", enabled=True)
    p._bar = None  # the plain path, as without tqdm
    p.step("one")
    p.step("two")
    p.close()
    assert "[demo 2/2] two" in capsys.readouterr().err


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value, match", [
    ("dtype", "float8", "dtype: expected one of"),
    ("baselines", ("eager", "cudnn"), "baselines: expected a subset"),
    ("modes", ("inference", "eval"), "modes: expected a subset"),
    ("levels", ("net",), "levels: expected a subset"),
    ("backends", ("gpu",), "backends: expected a subset"),
    ("size", 16, "size: expected >= 32"),
    ("device", "tpu", "device: expected"),
    ("processes", -1, "processes: expected 0"),
    ("train_precision", "fp8", "train_precision: expected 'amp' or 'cast'"),
])
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        config.resolve(config.BenchConfig(**{field: value}))


def test_train_precision_defaults():
    assert config.resolve(config.BenchConfig(device="cpu")).train_precision == "cast"  # float32
    assert config.resolve(config.BenchConfig(device="cpu", dtype="bfloat16")).train_precision == "amp"
    assert config.resolve(config.BenchConfig(device="cpu", dtype="float16", train_precision="cast")
                          ).train_precision == "cast"
    with pytest.raises(ValueError, match="'amp' needs dtype bfloat16 or float16"):
        config.resolve(config.BenchConfig(device="cpu", dtype="float32", train_precision="amp"))


@requires_c
@pytest.mark.parametrize("precision", ["amp", "cast"])
def test_model_training_precision(precision, monkeypatch):
    """bfloat16 training rows: AMP runs float32 parameters under autocast (both sides), cast runs
    the model cast to bfloat16; the row says which."""
    from fused_resnet.bench import models as bm
    from fused_resnet.bench._util import Progress

    seen = []
    real = bm.fused_model

    def spying(*a, **kw):
        mod, impl = real(*a, **kw)
        mod.register_forward_pre_hook(lambda m, args: seen.append(
            (torch.is_autocast_enabled("cpu"), next(m.parameters()).dtype, args[0].dtype)))
        return mod, impl

    monkeypatch.setattr(bm, "fused_model", spying)
    cfg = config.resolve(config.BenchConfig(model="resnet18", device="cpu", dtype="bfloat16", batch=4, train_batch=4,
                                            size=64, modes=("training",), levels=("model",), backends=("cpu",),
                                            baselines=("eager_cl",), repeats=1, warmup=0, peaks=False,
                                            progress=False, threads=1, processes=0, train_precision=precision))
    rows = bm.bench_models(cfg, bm.build_torchvision("resnet18", 0), None, Progress(2, "t", False))
    for r in rows:
        assert r["status"] == "ok", r
        assert ("AMP" in r["impl"]) == (precision == "amp"), r["impl"]
    # bfloat16 through 18 layers: eager's own error is large (first-conv gradient ~0.35 here), so
    # the fused side is held to the dtype rule, at most 2x eager's error in the same precision
    fused, eager = rows
    assert fused["err_logits"] < 0.1
    assert fused["max_rel_err"] <= 2 * eager["max_rel_err"], (fused["max_rel_err"], eager["max_rel_err"])
    want = (True, torch.float32, torch.float32) if precision == "amp" else (False, torch.bfloat16, torch.bfloat16)
    assert seen and all(s == want for s in seen), seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_cpu_defaults_and_what_is_skipped():
    cfg = config.resolve(config.BenchConfig())
    assert (cfg.device, cfg.dtype, cfg.batch, cfg.train_batch) == ("cpu", "float32", 8, 4)
    assert cfg.processes == 3  # whole-model timing in fresh processes on a CPU
    assert "compile" not in cfg.baselines and "cudnn_fused" not in cfg.baselines
    whats = " ".join(s["what"] for s in cfg.skipped)
    assert "compile" in whats and "fused:cuda" in whats
    assert all(s["why"] for s in cfg.skipped)


# ----------------------------------------------------------------------------- levels


@requires_c
def test_layer_rows_are_correct_and_timed():
    from fused_resnet.bench.layers import bench_layers

    cfg = config.resolve(config.BenchConfig(device="cpu", batch=2, train_batch=2, repeats=1, warmup=0, peaks=False,
                                            backends=("cpu",), baselines=("eager", "eager_cl")))
    model = torchvision.models.resnet18()
    picked = [s for s in shapes.conv_shapes(model, 2, 32) if s.name in ("layer1.0.conv2", "layer2.0.downsample.0")]
    rows = bench_layers(cfg, picked, {"tflops": 1.0, "gbps": 10.0}, Progress(4, "t", enabled=False))
    assert len(rows) == 2 * 2 * 3
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["max_rel_err"] < 1e-5, r  # float32 against the float64 reference
        assert r["tflops"] > 0 and r["pct_peak_tflops"] == pytest.approx(100 * r["tflops"])
    fused = [r for r in rows if r["variant"] == "fused:cpu" and r["mode"] == "inference"]
    eager = [r for r in rows if r["variant"] == "eager" and r["mode"] == "inference"]
    assert [r["launches"] for r in fused] == [1, 1]
    assert all(r["launches"] >= 2 for r in eager)


@requires_c
def test_fused_model_matches_torchvision():
    from fused_resnet.bench._util import randomize_bn
    from fused_resnet.bench.fusing import fused_model

    tv = randomize_bn(torchvision.models.resnet18(), torch.Generator().manual_seed(0)).eval()
    fm, impl = fused_model("resnet18", tv, "cpu")
    assert "fused_resnet" in impl
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv.double()(x.double())
        got = fm.eval()(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(got, ref) < 1e-4


# ----------------------------------------------------------------------------- check


@requires_c
def test_check_catches_a_wrong_backend(monkeypatch):
    real = functional.conv_bn_act

    def off_by_a_little(*a, **k):
        return real(*a, **k) * 1.001

    monkeypatch.setattr(functional, "conv_bn_act", off_by_a_little)
    rows = check.check_backend("cpu", "cpu", torch.float32)
    failed = {r["op"] for r in rows if not r["passed"]}
    assert failed == {"conv_bn_act", "conv_bn_act.backward"}


# ----------------------------------------------------------------------------- report


def _fake_result(tmp_path):
    from fused_resnet.bench._util import make_row
    from fused_resnet.bench.env import collect_env

    t = timing.summarize([1.0, 2.0, 3.0], "perf_counter")
    t2 = timing.summarize([2.0, 4.0, 6.0], "perf_counter")
    rows = [make_row("layer", "inference", "l1", "3x3", "eager", timing=t2, batch=2, flops=4e9, err=1e-7),
            make_row("layer", "inference", "l1", "3x3", "fused:cpu", timing=t, batch=2, flops=4e9, err=2e-7),
            make_row("model", "inference", "resnet18", "resnet18 64", "fused:cpu", timing=t, batch=2, err=1e-6),
            make_row("model", "inference", "resnet18", "resnet18 64", "compile", status="skipped", reason="why")]
    from fused_resnet.bench._util import add_speedups

    add_speedups(rows)
    cfg = config.resolve(config.BenchConfig(model="resnet18", device="cpu"))
    import dataclasses

    c = dataclasses.asdict(cfg)
    return {"env": collect_env(["fused-resnet", "bench"]), "config": c, "peaks": None, "skipped": c.pop("skipped"),
            "notes": [], "phases": {}, "rows": rows}


def test_report_writers(tmp_path):
    result = _fake_result(tmp_path)
    assert result["rows"][1]["speedup_vs_eager"] == pytest.approx(2.0)
    text = report.format_table(result)
    assert "fused:cpu" in text and "skipped: why" in text and "2.00" in text
    report.write_csv(result, tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("level,mode,name") and len(lines) == 5
    assert report.write_plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    paths = report.save_results(result, str(tmp_path / "results"))
    assert set(paths) == {"json", "md", "png"}
    md = open(paths["md"]).read()
    assert "AMD" in md or result["env"]["cpu"]["model"] in md
    assert json.load(open(paths["json"]))["env"]["versions"]["torch"] == torch.__version__


# ----------------------------------------------------------------------------- conv_only, vs cl, % conv


def test_comparison_columns_by_hand():
    from fused_resnet.bench._util import add_speedups, make_row

    def row(variant, ms, batch=32, name="l1"):
        t = timing.summarize([ms], "perf_counter")
        return make_row("layer", "inference", name, "3x3", variant, timing=t, batch=batch, flops=1e9)

    rows = [row("eager_cl", 4.0), row("conv_only", 2.0), row("fused:triton", 2.5), row("fused:cuda", 5.0),
            row("eager_cl", 8.0, batch=256), row("fused:triton", 10.0, batch=256)]
    add_speedups(rows)
    tri, cud, big = rows[2], rows[3], rows[5]
    assert tri["speedup_vs_eager_cl"] == pytest.approx(1.6) and tri["pct_conv_only_tflops"] == pytest.approx(80.0)
    assert cud["speedup_vs_eager_cl"] == pytest.approx(0.8) and cud["pct_conv_only_tflops"] == pytest.approx(40.0)
    assert rows[1]["pct_conv_only_tflops"] == pytest.approx(100.0)
    # another batch is another comparison: no conv_only row at batch 256, and eager_cl 8 ms there
    assert big["speedup_vs_eager_cl"] == pytest.approx(0.8) and big["pct_conv_only_tflops"] is None
    assert big["speedup_vs_eager"] is None  # no eager NCHW row at all


def test_conv_only_rows_are_the_convolution_alone():
    from fused_resnet.bench.layers import bench_layers

    cfg = config.resolve(config.BenchConfig(device="cpu", batch=2, train_batch=2, repeats=1, warmup=0, peaks=False,
                                            backends=(), baselines=("eager_cl", "conv_only"),
                                            modes=("inference",)))
    picked = [s for s in shapes.conv_shapes(torchvision.models.resnet18(), 2, 32) if s.name == "layer1.0.conv2"]
    from fused_resnet.bench._util import add_speedups

    rows = bench_layers(cfg, picked, None, Progress(1, "t", enabled=False))
    add_speedups(rows)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"eager_cl", "conv_only"}
    conv = by["conv_only"]
    assert conv["status"] == "ok" and "F.conv2d alone" in conv["impl"]
    assert conv["max_rel_err"] < 1e-5  # against the float64 convolution, not the BN/add/ReLU output
    assert conv["pct_conv_only_tflops"] == pytest.approx(100.0)
    assert by["eager_cl"]["pct_conv_only_tflops"] == pytest.approx(
        100 * conv["median_ms"] / by["eager_cl"]["median_ms"])
    text = report.format_table({"env": _fake_result(None)["env"], "config": dataclasses.asdict(cfg),
                                "peaks": None, "skipped": [], "notes": [], "rows": rows})
    assert "%conv" in text and "vs cl" in text
    assert "gm %conv" in report.format_summary({"rows": rows})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_conv_only_is_a_gpu_default_only():
    assert "conv_only" not in config.resolve(config.BenchConfig()).baselines
    assert "conv_only" in config.BASELINES


@requires_c
def test_count_launches_sees_ops_inside_a_training_tape(monkeypatch):
    """A fused block's training forward runs its ops inside one autograd.Function (the block tape):
    they still count, one per op, as they do op by op."""
    from torch import nn

    from fused_resnet import nn as fnn
    from fused_resnet.nn import _tape

    ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    blk = fnn.BasicBlock(8, 16, 2, ds, backend="cpu").train()
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    monkeypatch.setenv(_tape.FAST_TRAIN_ENV, "1")
    assert type(blk(x).grad_fn).__name__ == "BlockFunctionBackward"
    # 3 units x (conv_stats, bn_finalize, bn_update_running_stats) + one bn_add_act
    assert timing.count_launches(lambda: blk(x), torch.device("cpu")) == (10, "top-level ops")


# ----------------------------------------------------------------------------- fresh processes


def _tiny_model_cfg(**kw):
    return config.resolve(config.BenchConfig(model="resnet18", device="cpu", batch=2, train_batch=2, size=32,
                                             modes=("inference",), levels=("model",), backends=("cpu",),
                                             baselines=("eager_cl",), repeats=2, warmup=0, peaks=False,
                                             progress=False, threads=1, **kw))


@requires_c
def test_model_timing_in_fresh_processes():
    """Each variant is timed in its own process per round; the row's median is the median of the
    processes' medians, and the errors come from the children's real runs against float64."""
    from fused_resnet.bench._util import Progress
    from fused_resnet.bench.models import bench_models, build_torchvision

    cfg = _tiny_model_cfg(processes=2)
    rows = bench_models(cfg, build_torchvision("resnet18", 0), None, Progress(2, "t", False))
    assert [r["variant"] for r in rows] == ["fused:cpu", "eager_cl"]
    for r in rows:
        assert r["status"] == "ok", r
        assert len(r["process_medians_ms"]) == 2
        assert r["median_ms"] == pytest.approx(sum(r["process_medians_ms"]) / 2)
        assert r["repeats"] == 4 and "2 fresh processes" in r["timing_method"]
        assert 0 < r["max_rel_err"] < 1e-4
        assert r["images_per_s"] == pytest.approx(2 / (r["median_ms"] * 1e-3))
    assert rows[0]["launches"] < rows[1]["launches"]  # counted in the first round's child


@requires_c
def test_child_processes_import_this_fused_resnet_from_any_directory(tmp_path, monkeypatch):
    """`pip install . && fused-resnet bench` from the checkout: the children must not import the
    checkout's fused_resnet (first on a `python -m` child's sys.path when it is the working
    directory) instead of the installed one. A decoy package in the working directory stands in."""
    from fused_resnet.bench._util import Progress
    from fused_resnet.bench.models import bench_models, build_torchvision

    (tmp_path / "fused_resnet").mkdir()
    (tmp_path / "fused_resnet" / "__init__.py").write_text("raise ImportError('the decoy fused_resnet')\n")
    monkeypatch.chdir(tmp_path)
    cfg = _tiny_model_cfg(processes=1)
    rows = bench_models(cfg, build_torchvision("resnet18", 0), None, Progress(2, "t", False))
    assert [r["status"] for r in rows] == ["ok", "ok"], rows


@requires_c
def test_a_failing_child_process_gives_a_failed_row(monkeypatch):
    import subprocess

    from fused_resnet.bench._util import Progress
    from fused_resnet.bench.models import bench_models, build_torchvision

    real = subprocess.run

    def run(cmd, **kw):
        if "fused_resnet.bench._isolated" in cmd:
            return real([cmd[0], "-c", "import sys; sys.exit('boom: no model here')"], **kw)
        return real(cmd, **kw)

    monkeypatch.setattr(subprocess, "run", run)
    cfg = _tiny_model_cfg(processes=1)
    rows = bench_models(cfg, build_torchvision("resnet18", 0), None, Progress(2, "t", False))
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "process exited with 1: boom: no model here" in rows[0]["reason"]


@requires_c
def test_a_timing_process_builds_only_its_variant():
    from fused_resnet.bench.models import _Prep, _variants, build_torchvision

    cfg = _tiny_model_cfg(processes=1)
    prep = _Prep(cfg, build_torchvision("resnet18", 0), "inference")
    assert list(_variants(cfg, prep)) == ["fused:cpu", "eager_cl"]
    assert list(_variants(cfg, prep, only="eager_cl")) == ["eager_cl"]
    only_fused = _variants(cfg, prep, only="fused:cpu")
    assert list(only_fused) == ["fused:cpu"] and only_fused["fused:cpu"][0] is not None


def test_cpu_model_warmup():
    assert config.warmup_for(config.resolve(config.BenchConfig(device="cpu")), "model") == 3
    assert config.warmup_for(config.resolve(config.BenchConfig(device="cpu")), "layer") == 1
    assert config.warmup_for(config.resolve(config.BenchConfig(device="cpu", warmup=0)), "model") == 0
