"""`fused-resnet info`: versions, what _C contains, which backends run here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

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
