"""Host emulation of the CUDA implicit-GEMM kernel's index math (no GPU needed).

``csrc/cuda/host_test/igemm_host_test.cpp`` runs every CTA of several convolutions (padding,
stride 2 with odd sizes, dilation, rectangular filters, partial M / N / K tiles, both tile
configurations; grouped convolutions with K/groups = 8, 16, 64 and 200, partial tiles and the
prologue on global channels; float32 / TF32 with 4-element vectors, the 16-element k-tile, the
m16n8k8 .tf32 fragments and the two-pass f32 epilogue, incl. C/groups = 4) through the kernel's
own address / swizzle / fragment functions (``csrc/cuda/igemm_layout.cuh``), emulates ldmatrix
(b16, also on f32 rows) and mma.m16n8k16 / m16n8k8 .tf32 from the PTX ISA's definitions, and
checks the fragments, bank-conflict freedom and the result against a naive (grouped)
convolution; and the Chan merge of the float32 epilogue's two 64-row statistics passes against
the two-pass statistics of the whole chunk for every chunk height. Here it is compiled with the
host C++ compiler (or the CUDA toolkit's nvcc as a host compiler) and run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "cuda" / "host_test" / "igemm_host_test.cpp"


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return [shutil.which(name), "-x", "c++"]
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc compiles a .cpp as host code
        return [nvcc]
    return None


def test_igemm_index_math_emulated_on_host(tmp_path):
    cc = _compiler()
    if cc is None:
        pytest.skip("no C++ compiler (g++, clang++, c++ or nvcc) on PATH")
    exe = tmp_path / "igemm_host_test"
    build = subprocess.run([*cc, "-std=c++17", "-O2", str(SRC), "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, f"compile failed:\n{build.stdout}\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and out.startswith("OK "), out
    # The emulation visits every fragment element of every CTA: far more than a million checks.
    assert int(out.split()[1]) > 1_000_000, out
