"""Tensors too large for 32-bit indexing (more than 2^31 elements) through the CPU backend.

The CPU kernels index with int64 (rows ``m = numel / K`` and offsets ``r * K + c`` are
``int64_t``, csrc/cpu), so such a tensor is computed, not refused. Checked on bn_add_act in
bfloat16: z has 2^31 + 1,048,576 elements (4 GiB), the output as many; peak memory about 8.7 GiB,
about 20 s on 2 loaded cores (bfloat16 rather than float16: the float16 epilogue is about 3x
slower on CPU, its conversions are not vectorized).
The input is a random (4099 rows x K) block repeated along the rows: 4099 * K does not divide 2^32,
so an offset that wrapped around at 32 bits would read a different row's values and show; the
output is compared with the reference on row slices at the start, across the 2^31 boundary and
at the end. The test skips (with the reason) when the machine has less free memory than it needs.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import CL, requires_c

from fused_resnet import functional as FF
from fused_resnet import reference as ref

K = 64
ROWS = (2**31 + 2**20) // K  # rows of the (M, K) channels_last view: 2^31 + 2^20 elements
N, H, W = 2, 1024, ROWS // (2 * 1024)
PERIOD = 4099  # rows of the repeated random block (prime: 4099 * K does not divide 2^32)
NEED_BYTES = 2 * N * K * H * W * 2 + (1 << 30)  # z and y in bfloat16, plus 1 GiB of slack


def _free_bytes() -> int:
    """Memory available to a new allocation: MemAvailable (free + reclaimable cache) on Linux,
    else the free pages (os.sysconf), else assume enough."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return NEED_BYTES


@requires_c
@pytest.mark.skipif(_free_bytes() < NEED_BYTES,
                    reason=f"needs {NEED_BYTES / 2**30:.1f} GiB of free memory, has {_free_bytes() / 2**30:.1f} GiB")
def test_bn_add_act_over_2_31_elements_cpu():
    assert N * H * W == ROWS and N * K * H * W > 2**31
    gen = torch.Generator().manual_seed(0)
    block = (torch.randn(PERIOD, K, generator=gen) * 2).bfloat16()
    scale = torch.rand(K, generator=gen) + 0.5
    shift = torch.randn(K, generator=gen)

    z = torch.empty(N, K, H, W, dtype=torch.bfloat16, memory_format=CL)
    rows = z.permute(0, 2, 3, 1).view(ROWS, K)  # the (M, K) view of channels_last memory
    full = ROWS // PERIOD
    rows[: full * PERIOD].view(full, PERIOD, K).copy_(block.expand(full, PERIOD, K))
    rows[full * PERIOD:].copy_(block[: ROWS - full * PERIOD])

    y = FF.bn_add_act(z, scale, shift, relu=True, backend="cpu")
    assert y.shape == z.shape and y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    del z
    out = y.permute(0, 2, 3, 1).view(ROWS, K)
    boundary = 2**31 // K  # the first row whose elements lie past 2^31
    for lo in (0, boundary - 3000, ROWS - 5000):
        idx = torch.arange(lo, lo + 5000)
        src = block[idx % PERIOD].view(1, -1, 1, K).permute(0, 3, 1, 2)  # (1, K, rows, 1)
        want = ref.bn_add_act(src.double(), scale.double(), shift.double(), relu=True)
        got = out[lo: lo + 5000].view(1, -1, 1, K).permute(0, 3, 1, 2)
        torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=8e-3, msg=f"rows {lo}..{lo + 5000}")
