"""The README's usage example runs as written, and .ci/run runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_usage_example_runs():
    code = next(b for b in _blocks("python") if "conv_bn_act" in b)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    out = scope["out"]
    assert out.shape == (8, 64, 56, 56) and (out >= 0).all()


def test_models_example_runs():
    code = next(b for b in _blocks("python") if "fuse(" in b)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert scope["y"].shape == (2, 10)
    assert scope["report"].counts["fused"] > 0
    assert type(scope["plain"].layer1[0]) is type(scope["tv"].layer1[0])


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(b.strip() for b in _blocks("bash") if "pytest" in b)
    if not ci:
        pytest.fail(".ci/run is empty")
    assert command in ci, "the README's test command and .ci/run have drifted apart"
