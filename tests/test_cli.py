"""The command line: `fused-resnet info`, `bench` (tiny run: every level, mode and output) and `check`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from fused_resnet import _ext, cli


def test_info_json_has_every_field(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["extension"]["loaded"] == _ext.available()
    assert set(info["backends"]["cpu"]) == {"torch", "cpu", "cuda", "triton"}
    assert info["backends"]["cpu"]["torch"] == "usable"
    if _ext.available():
        assert info["extension"]["kernels"]["conv_bn_act"][0] == "CPU"
        assert info["backends"]["cpu"]["cpu"] == "usable"


def test_info_table(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "_C" in out and "backends:" in out


def test_console_script_is_installed():
    exe = shutil.which("fused-resnet")
    cmd = [exe, "info"] if exe else [sys.executable, "-m", "fused_resnet.cli", "info"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout


# ----------------------------------------------------------------------------- bench and check

TINY = ["bench", "--model", "resnet18", "--batch", "1", "--train-batch", "2", "--layer-batch", "1", "--size", "32",
        "--repeats", "1", "--warmup", "0", "--threads", "1", "--processes", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """One tiny `fused-resnet bench` run (every level and mode) shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    paths = {k: out / f"r.{k}" for k in ("json", "csv", "png")}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(TINY + ["--json", str(paths["json"]), "--csv", str(paths["csv"]), "--plot", str(paths["png"]),
                              "--results", str(out / "results")])
    return rc, buf.getvalue(), paths, out


def test_bench_runs_and_prints_a_table(tiny_bench):
    rc, text, _, _ = tiny_bench
    assert rc == 0
    assert "== model / inference" in text and "== layer / training" in text and "== block / inference" in text
    assert "fused:" in text and "eager_cl" in text
    if not torch.cuda.is_available():
        assert "GPU figures need a GPU" in text


def test_bench_json_has_every_field(tiny_bench):
    _, _, paths, _ = tiny_bench
    r = json.loads(paths["json"].read_text())
    env = r["env"]
    assert env["versions"]["torch"] == torch.__version__ and env["cpu"]["model"] and env["cpu"]["usable_cores"] >= 1
    assert env["command"].startswith("fused-resnet bench") and env["timestamp_utc"].endswith("Z")
    assert r["config"]["model"] == "resnet18" and r["config"]["batch"] == 1
    assert r["peaks"]["tflops"] > 0 and r["peaks"]["gbps"] > 0
    rows = r["rows"]
    assert {(x["level"], x["mode"]) for x in rows} == {(lv, m) for lv in ("layer", "block", "model")
                                                      for m in ("inference", "training")}
    assert not [x for x in rows if x["status"] == "failed"], [x for x in rows if x["status"] == "failed"][:2]
    ok = [x for x in rows if x["status"] == "ok"]
    assert {x["variant"] for x in ok} >= {"eager", "eager_cl"}
    eager_err = {}
    for x in ok:
        if x["variant"] in ("eager", "eager_cl"):
            key = (x["level"], x["mode"], x["name"])
            eager_err[key] = max(eager_err.get(key, 0.0), x["max_rel_err"])
    for x in ok:
        assert 0 < x["p20_ms"] <= x["median_ms"] <= x["p80_ms"], x
        assert x["images_per_s"] > 0 and x["tflops"] > 0 and x["pct_peak_tflops"] > 0
        assert x["err_vs"] and x["impl"]
        # float32 against float64: at most twice PyTorch's own error on the same row (training BN
        # over 1x1 late-stage maps at batch 2 is ill-conditioned for everyone), plus a floor
        assert x["max_rel_err"] <= 2 * eager_err[(x["level"], x["mode"], x["name"])] + 1e-5, x
        assert x["max_rel_err"] < 0.05, x
        if x["variant"] == "eager":
            assert x["speedup_vs_eager"] == pytest.approx(1.0)
    assert all(x["reason"] for x in rows if x["status"] == "skipped")
    assert r["skipped"] and all(s["why"] for s in r["skipped"])
    if _ext.available():
        fused_layers = [x for x in ok if x["variant"] == "fused:cpu" and x["level"] == "layer"
                        and x["mode"] == "inference"]
        assert fused_layers and all(x["launches"] == 1 for x in fused_layers)
        assert {x["level"] for x in ok if x["variant"] == "fused:cpu"} == {"layer", "block", "model"}


def test_bench_csv_png_and_results_folder(tiny_bench):
    _, _, paths, out = tiny_bench
    r = json.loads(paths["json"].read_text())
    lines = paths["csv"].read_text().splitlines()
    assert lines[0].startswith("level,mode,name,label,variant,status,median_ms") and len(lines) == 1 + len(r["rows"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = sorted(p.suffix for p in (out / "results").iterdir())
    assert saved == [".json", ".md", ".png"]


def test_bench_bad_arguments(capsys):
    assert cli.main(["bench", "--baselines", "eager,cudnn", "--no-progress"]) == 2
    assert "baselines: expected a subset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--dtype", "float8"])


@pytest.mark.skipif(not _ext.available(), reason="fused_resnet._C not loaded")
def test_check_passes_on_cpu_backends(capsys):
    from fused_resnet.bench import check

    assert cli.main(["check", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and all(r["passed"] for r in result["rows"])
    cpu_rows = [r for r in result["rows"] if r["backend"] == "cpu"]
    assert {r["op"] for r in cpu_rows} >= {"conv_bn_act", "conv_stats.z", "conv_stats.M2", "bn_finalize",
                                           "bn_add_act", "conv_bn_act.backward"}
    assert {r["dtype"] for r in cpu_rows} == {"float32", "float64", "float16", "bfloat16"}
    table = check.format_check(result)
    assert "ALL PASS" in table and "cpu    cpu     bfloat16" in table


def test_bench_help_from_console_script():
    exe = shutil.which("fused-resnet")
    cmd = [exe, "bench", "--help"] if exe else [sys.executable, "-m", "fused_resnet.cli", "bench", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--baselines" in out.stdout and "--json" in out.stdout
