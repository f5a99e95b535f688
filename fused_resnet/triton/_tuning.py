"""Autotuning candidates of the implicit-GEMM conv kernel (pure Python: no triton import).

Unmeasured: the Triton backend has not run on a GPU yet. The choices below are reasoned from
the ResNet-50 layer shapes' FLOP/byte floors (``benchmarks/NOTES.md``, "Triton configs
(unmeasured, 2026-11-23)") and from the tile shapes public Triton GEMM/conv kernels use on
A100/H100 in 16-bit types (128x128x64 with 3-4 stages and 8 warps for large problems; 64-wide
tiles with 4 warps and 4 stages for small ones), then checked by compiling every menu entry
for sm_90 without a GPU (triton 3.8, ``triton.compile`` with a ``GPUTarget``, resource usage
from ``cuobjdump``): all compile to wgmma with cp.async pipelines; 128x256 and 256x128 tiles
with 8 warps hit 255 registers and spill (200-560 bytes of stack) in this kernel (its per-row
int64 addresses cost registers a plain GEMM does not spend), so they are not in the menu;
64x256 and 256x64 with 8 warps do not spill. Re-decide from ``TRITON_PRINT_AUTOTUNING=1``
output of a GPU run.

Decisions:

* **A fixed menu, pruned per shape to at most** :data:`MAX_CANDIDATES` (3). Every candidate is
  compiled once per kernel specialisation (dtype, R x S, prologue/epilogue flags) on the first
  call of a shape, and a compile of this kernel costs about a second or two: ResNet-50's 20
  distinct inference shapes then cost at most 60 tuning runs (fewer compiles: shapes that share
  a specialisation reuse them), instead of 6 x 20 with the previous unpruned menu.
* **BLOCK_K is derived, not tuned**: ``min(64, next_pow2(C/groups))`` for 16-bit types
  (a 64-wide K step is 128 bytes per row: full-width loads and whole wgmma K steps), halved to
  32 for float32/TF32 so a pipeline stage keeps the same bytes; at least 16 (``tl.dot``'s
  minimum).
* **Packed taps for few input channels** (:func:`packs_taps`; ``C/groups <`` :data:`PACK_TAPS_BELOW`,
  one group, dilation 1 along W, S > 1 -- the stem, C = 3): in NHWC the S taps of one kernel row
  read S adjacent pixels, i.e. ONE contiguous run of ``S * C`` elements, so the kernel reduces
  over (s, c) runs, one per kernel row, instead of over one tap at a time. BLOCK_K is then 16
  whatever the run (:func:`block_k_for` with ``packed``): such runs are unaligned scalar loads
  (C = 3 is not a multiple of a vector), one register per element and stage, and the sm_90
  compile of the stem at BLOCK_K = 32 spilled (488-1032 bytes of stack with 4 warps on 128x64
  or 8 warps on 256x64) where 16 does not. The stem then takes 14 K steps of 16 (two per kernel
  row: 16 + 5 of its 21 elements) instead of 49 steps of 16 with 3 used: 3.5x fewer MMA K steps
  and loop iterations, 1.5x wasted K slots instead of 5.3x (prediction in NOTES, unmeasured).
* **BLOCK_N is capped** at ``next_pow2(K/groups)`` (at least 16): N = 64 layers never compute
  half-empty 128-wide tiles, and ResNeXt groups (4-32 channels) get the narrow tiles; and it
  is at least ``min(64, cap)``: narrow tiles only serve narrow groups (a 16-wide tile on a
  512-channel layer re-reads the input 32 times).
* **Shared memory**: ``stages * (BLOCK_M + BLOCK_N) * BLOCK_K * element size`` must fit the
  device's opt-in shared memory per block (A100 163 KiB, H100 227 KiB); a candidate that would
  fail with OutOfResources is not even compiled.
* **Fill the machine, then prefer big tiles**: among candidates whose tile count
  (``cdiv(M, BLOCK_M) * cdiv(K/groups, BLOCK_N) * groups``) is at least one wave (the SM
  count), the largest tiles are kept (most operand reuse per byte loaded); when fewer than
  :data:`MAX_CANDIDATES` fill a wave (late layers at batch 32: M = 1568), the next candidates
  are the ones with the most tiles (tile counts include the split-K factor, below).
* **Split-K only where even the smallest regular tile leaves the GPU idle** (:func:`split_k`):
  when ``cdiv(M, 64) * cdiv(K/groups, 64) * groups`` is under one wave (the SM count) -- batch 1-8
  late layers, e.g. layer4's 3x3 at batch 1: M = 49, 8 tiles for 132 SMs -- the reduction loop
  is cut into ``min(8, cdiv(#SMs, tiles), steps / 4)`` contiguous shares, one program each, whose
  float32 partial sums go to a ``(split, M, K)`` workspace; a second launch sums them in split
  order (deterministic) and runs the same fused epilogue. The launcher chooses the split (a key
  of the autotuner), not the autotuner: triton's autotuner times only the first launch, so it
  would favour splits whose cost is in the second. Where 64x64 tiles already fill a wave (every
  ResNet-50 layer at batch >= 32 on an H100) nothing changes; whether a split should also be
  offered against small tiles there is for a measured run to say. ``FUSED_RESNET_TRITON_SPLIT_K``
  forces a split (a positive integer) for experiments and tests; under the interpreter (no
  device to size a wave by) the default is no split.
* **1x1 stride-1 convolutions** take the same menu; the kernel compiles them as a plain GEMM
  (``IS_GEMM``: no index arithmetic, one tap).
* **TF32**: float32 inputs use TF32 tensor cores only when ``torch.backends.cudnn.allow_tf32``
  is True (read on every call; part of the tuning key), IEEE float32 otherwise.
"""

from __future__ import annotations

import os

#: (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_K is derived per shape (see module docstring).
TILES = (
    (128, 128, 8, 4),  # the workhorse for large M and N >= 128
    (128, 128, 8, 3),
    (64, 256, 8, 3),  # N >= 256 (conv3 / projections, layer3-4)
    (256, 64, 8, 3),  # N = 64 with a very large M (stem, layer1 at batch 256)
    (128, 64, 4, 4),  # N = 64 layers
    (64, 128, 4, 4),  # small M (late layers at small batch)
    (64, 64, 4, 4),  # smallest regular tile: most tiles for a small M
    (64, 32, 4, 4),  # ResNeXt groups with 32 output channels
    (64, 16, 4, 3),  # ResNeXt / depthwise groups with 4-16 output channels
)
BLOCK_KS = (16, 32, 64)
MAX_CANDIDATES = 3
#: Used when the device cannot be asked: an A100's opt-in shared memory per block, 132 SMs.
DEFAULT_SMEM = 163 * 1024
DEFAULT_SMS = 132


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def block_k_for(cg: int, elem_size: int, packed: bool = False) -> int:
    """BLOCK_K for a contiguous reduction run of ``cg`` elements (C/groups input channels, or
    ``S * C`` with packed taps) of ``elem_size`` bytes each; always 16 for packed taps."""
    if packed:
        return 16
    cap = 64 if elem_size <= 2 else 32
    return max(16, min(cap, next_pow2(cg)))


#: Convolutions with fewer input channels per group than this pack their taps along W into the
#: reduction (:func:`packs_taps`): below 16, one tap fills less than half of the smallest K step.
PACK_TAPS_BELOW = 16


def packs_taps(cg: int, s: int, groups: int, dil_w: int) -> bool:
    """Whether the conv kernel reduces over contiguous (tap along W, channel) runs of ``S * C``
    elements (one per kernel row) rather than over each tap's ``C`` channels: few channels, one
    group (a group's channels are not adjacent to the next pixel's), W-dilation 1 (the S pixels
    are adjacent), and more than one tap along W."""
    return cg < PACK_TAPS_BELOW and groups == 1 and dil_w == 1 and s > 1


def reduction_run(cg: int, s: int, packed: bool) -> int:
    """Length of the contiguous reduction run one K-loop step walks: ``S * C`` or ``C/groups``."""
    return s * cg if packed else cg


#: Shared memory the epilogue may add on top of the pipeline buffers (the statistics epilogue's
#: reductions took up to 17 KiB in sm_90 compiles of the menu).
EPILOGUE_SMEM = 18 * 1024


def smem_bytes(bm: int, bn: int, bk: int, stages: int, elem_size: int) -> int:
    """Shared memory of the pipelined A (BM x BK) and B (BK x BN) tiles plus :data:`EPILOGUE_SMEM`."""
    return stages * (bm + bn) * bk * elem_size + EPILOGUE_SMEM


def menu() -> list[tuple[int, int, int, int, int]]:
    """Every (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner is declared with."""
    return [(bm, bn, bk, w, s) for (bm, bn, w, s) in TILES for bk in BLOCK_KS]


#: Split-K limits: at most this many programs per output tile, each with at least
#: :data:`MIN_STEPS_PER_SPLIT` steps of the reduction loop.
MAX_SPLIT_K = 8
MIN_STEPS_PER_SPLIT = 4
SPLIT_K_ENV = "FUSED_RESNET_TRITON_SPLIT_K"


def reduction_steps(r: int, s: int, cg: int, elem_size: int, packed: bool) -> int:
    """Steps of the conv kernel's reduction loop for one output tile at the largest BLOCK_K
    this shape uses (:func:`block_k_for`)."""
    run = reduction_run(cg, s, packed)
    per_row = -(-run // block_k_for(run, elem_size, packed))
    return (r if packed else r * s) * per_row


def split_k(m: int, kg: int, groups: int, steps: int, n_sm: int) -> int:
    """How many programs share one output tile's reduction (see the module docstring): 1 unless
    64x64 tiles (``cdiv(M, 64) * cdiv(kg, 64) * groups``) are fewer than ``n_sm``."""
    tiles = -(-m // 64) * -(-kg // 64) * groups
    if tiles <= 0 or tiles >= n_sm:
        return 1
    return max(1, min(MAX_SPLIT_K, -(-n_sm // tiles), steps // MIN_STEPS_PER_SPLIT))


def forced_split_k() -> int | None:
    """``FUSED_RESNET_TRITON_SPLIT_K`` as a positive integer, or None when unset / ``auto``."""
    raw = os.environ.get(SPLIT_K_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{SPLIT_K_ENV}: expected 'auto' or a positive integer, got {raw!r}")
    return n


def select(items, m: int, kg: int, cg: int, groups: int, elem_size: int, smem: int = DEFAULT_SMEM,
           n_sm: int = DEFAULT_SMS, as_tuple=lambda i: i, packed: bool = False, split: int = 1) -> list:
    """The candidates kept for one shape (see the module docstring), in the menu's order.

    m: GEMM rows (N * P * Q); kg: output channels per group; cg: the contiguous reduction run
    (:func:`reduction_run`: input channels per group, or ``S * C`` with packed taps, ``packed``);
    split: programs per output tile (:func:`split_k`), a factor of every tile count; elem_size: bytes per
    activation element; smem: shared memory per block (bytes); n_sm: SM count. ``items`` are
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples, or anything ``as_tuple`` maps to
    one (``triton.Config``); the kept items are returned themselves. Never empty: if nothing
    fits, the smallest tile with the derived BLOCK_K is kept.
    """
    bk = block_k_for(cg, elem_size, packed)
    bn_cap = max(16, next_pow2(kg))
    raw = [(i, tuple(as_tuple(i))) for i in items]
    same_k = [(i, c) for i, c in raw if c[2] == bk]
    bn_min = min(64, bn_cap)
    fits = [(i, c) for i, c in same_k if bn_min <= c[1] <= bn_cap
            and smem_bytes(c[0], c[1], c[2], c[4], elem_size) <= smem]
    if not fits:
        smallest = min(same_k or raw, key=lambda ic: ic[1][0] * ic[1][1])
        return [smallest[0]]

    def tiles(c):
        return -(-m // c[0]) * -(-kg // c[1]) * groups * split

    full = sorted((ic for ic in fits if tiles(ic[1]) >= n_sm), key=lambda ic: -(ic[1][0] * ic[1][1]))
    rest = sorted((ic for ic in fits if tiles(ic[1]) < n_sm), key=lambda ic: -tiles(ic[1]))
    kept = {id(i) for i, _ in (full + rest)[:MAX_CANDIDATES]}
    return [i for i, _ in fits if id(i) in kept]
