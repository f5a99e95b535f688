"""What `pip install .` built. CI sets FUSED_RESNET_EXPECT_C=1 (and FUSED_RESNET_EXPECT_CUDA=1 where
a CUDA toolkit and a CUDA build of torch are present), so a build that silently lost its kernels
fails there instead of skipping the compiled-kernel tests."""

from __future__ import annotations

import os
import sys
import threading
import time

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


def _openmp_torch() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def test_cpu_kernels_built_with_openmp_where_torch_uses_it():
    """at::parallel_for is a header template: without -fopenmp in our own build every CPU kernel
    ran on one thread (it did, until setup.py's openmp_flags)."""
    if not _ext.available():
        pytest.skip(f"_C not loaded ({_ext.problem})")
    if not (_openmp_torch() and sys.platform.startswith("linux")):
        pytest.skip("torch's parallel backend is not OpenMP on Linux here")
    assert _ext.build_info.get("openmp") is True, _ext.build_info


def _thread_cpu_ticks() -> dict[int, int]:
    """user + system clock ticks of every thread of this process (Linux /proc)."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        ticks[int(tid)] = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="needs Linux /proc and at least 2 CPUs")
def test_cpu_kernels_run_on_more_than_one_thread():
    """With 2 threads, a large bn_add_act_backward spends CPU time outside the calling thread."""
    if not _ext.available():
        pytest.skip(f"_C not loaded ({_ext.problem})")
    if not _openmp_torch():
        pytest.skip("torch's parallel backend is not OpenMP")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 64, 64, 64, generator=g).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(z.shape, generator=g).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    op = torch.ops.fused_resnet.bn_add_act_backward.default
    before_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        op(grad, z, scale, shift, None, None, None, True)
        main = threading.get_native_id()
        t0, before = time.perf_counter(), _thread_cpu_ticks()
        while time.perf_counter() - t0 < 1.0:
            op(grad, z, scale, shift, None, None, None, True)
        after = _thread_cpu_ticks()
    finally:
        torch.set_num_threads(before_threads)
    used = {tid: after[tid] - before.get(tid, 0) for tid in after}
    others = sum(t for tid, t in used.items() if tid != main)
    assert used.get(main, 0) > 0 and others >= 0.3 * used[main], used
