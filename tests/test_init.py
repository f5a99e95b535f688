"""The package's public names load lazily and resolve to the right objects."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fused_resnet


def test_lazy_submodules_and_fuse():
    from fused_resnet import convert, distributed, models, nn

    assert fused_resnet.nn is nn and fused_resnet.models is models and fused_resnet.distributed is distributed
    assert fused_resnet.fuse is convert.fuse and fused_resnet.unfuse is convert.unfuse
    for name in fused_resnet.__all__:
        assert getattr(fused_resnet, name) is not None


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        fused_resnet.no_such_thing  # noqa: B018


def test_import_does_not_pull_torchvision():
    code = "import sys, fused_resnet; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FUSED_RESNET_QUIET": "1",
                              "PYTHONPATH": str(Path(fused_resnet.__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
