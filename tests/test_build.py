"""What `pip install .` built. CI sets FUSED_RESNET_EXPECT_C=1 (and FUSED_RESNET_EXPECT_CUDA=1 where
a CUDA toolkit and a CUDA build of torch are present), so a build that silently lost its kernels
fails there instead of skipping the compiled-kernel tests."""

from __future__ import annotations

import os

import pytest
import torch

from fused_resnet import _ext
from fused_resnet.cli import OPS


def _expect(name):
    return os.environ.get(name, "").strip() not in ("", "0")


def test_compiled_extension_loaded_when_expected():
    if not _expect("FUSED_RESNET_EXPECT_C") and not _ext.available():
        pytest.skip(f"_C not loaded ({_ext.problem}) and FUSED_RESNET_EXPECT_C is not set")
    assert _ext.available(), _ext.problem
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", "CPU"), op


def test_cuda_kernels_compiled_when_expected():
    if not _expect("FUSED_RESNET_EXPECT_CUDA"):
        pytest.skip("FUSED_RESNET_EXPECT_CUDA is not set")
    assert _ext.available(), _ext.problem
    assert _ext.build_info.get("cuda") is True, _ext.build_info
    assert "80" in _ext.build_info["cuda_archs"] and "90" in _ext.build_info["cuda_archs"]
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", "CUDA"), op
