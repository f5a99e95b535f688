// Index math of the implicit-GEMM convolution (igemm.cu), kept free of CUDA intrinsics so
// that the same functions run in the kernel and in the host-only emulation test
// (csrc/cuda/host_test/igemm_host_test.cpp, driven by tests/test_igemm_host.py).
//
// The GEMM view of conv(x, w) with x NHWC (N, H, W, C) and w as (K, R, S, C) (the
// channels_last-contiguous weight):
//   rows    m in [0, M),    M = N * P * Q     (one output pixel (n, p, q) each)
//   columns n in [0, K)                      (output channels)
//   reduction k in [0, KR), KR = R * S * C   (k = (r * S + s) * C + c: contiguous in x's
//                                             channels and in w's rows)
//   A[m][k] = x[n][p*sh - ph + r*dh][q*sw - pw + s*dw][c]   (0 outside the image: padding)
//   B[k][n] = w[n][r][s][c]                                  (w is B^T, row-major)
// Grouped convolution (G groups, Cg = C / G input and Kg = K / G output channels a group) is
// G independent GEMMs of M x Kg x (R * S * Cg): group g reads x's channels [g*Cg, (g+1)*Cg)
// (x's channel stride stays C), the weight rows [g*Kg, (g+1)*Kg) of the (K, R, S, Cg) weight,
// and writes output channels [g*Kg, (g+1)*Kg). Below, `c` / `k` of ConvShape are the totals
// (strides), `cg` / `kg` the per-group counts; KR = R * S * Cg; groups == 1 is Cg = C.
// Every 16-byte vector (8 f16/bf16 or 4 f32 elements) of the reduction lies inside one
// (r, s) because Cg is a multiple of the vector, so one predicate and one address per vector.
//
// Shared memory is addressed in 16-bit units whatever the element type: a tile row is 64
// bytes = 4 16-byte vectors = 32 f16/bf16 or 16 f32 elements of the reduction. The byte
// layout (swizzle, loader assignment, ldmatrix row addresses) is therefore the same for the
// 16-bit kernels (mma.m16n8k16) and the TF32 kernel (mma.m16n8k8 .tf32, whose k8 step is the
// same 32 bytes a row as a k16 step of 16-bit elements).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FR_HD __host__ __device__ __forceinline__
#else
#define FR_HD inline
#endif

namespace fused_resnet {
namespace cuda {
namespace igemm {

constexpr int kBM = 128;     // CTA tile rows (output pixels); also the statistics chunk
constexpr int kBK = 32;      // tile row length in 16-bit units (64 bytes)
constexpr int kVec = 8;      // 16-bit units (f16/bf16 elements) per 16-byte vector
constexpr int kChunks = kBK / kVec;  // 16-byte vectors per smem tile row (4)

// Elements per 16-byte vector and reduction elements per k-tile for an element of `bytes`
// (2: f16/bf16, 4: f32/TF32).
FR_HD constexpr int vec_elems(int bytes) { return 16 / bytes; }
FR_HD constexpr int bk_elems(int bytes) { return kChunks * vec_elems(bytes); }

struct ConvShape {
  int64_t n, h, w, c;   // input (NHWC); c = all channels (x's channel stride)
  int64_t k;            // output channels, all groups (y's channel stride)
  int r, s;             // filter
  int64_t p, q;         // output spatial size
  int sh, sw, ph, pw, dh, dw;
  int64_t groups = 1, cg = 0, kg = 0;  // groups; channels per group (cg = c / groups, kg = k / groups)
  FR_HD int64_t rows() const { return n * p * q; }
  FR_HD int64_t red() const { return static_cast<int64_t>(r) * s * cg; }
};

// The two CTA tile configurations (kBM x BN): warps and pipeline depth. Warp tiles are
// 64 x 32 in both. Static shared memory stays <= 48 KiB:
//   BN = 128: 3 stages x (128 + 128) x 32 x 2 B = 48 KiB
//   BN =  64: 4 stages x (128 +  64) x 32 x 2 B = 48 KiB
template <int BN>
struct Tile;
template <>
struct Tile<128> {
  static constexpr int kWarpsM = 2, kWarpsN = 4, kStages = 3;
};
template <>
struct Tile<64> {
  static constexpr int kWarpsM = 2, kWarpsN = 2, kStages = 4;
};

// Per-row (output pixel) data a loader thread keeps for the whole main loop.
struct RowInfo {
  int64_t base;  // element offset of image n, group g's first channel in x (n*H*W*C + g*Cg)
  int ih0;       // p * sh - ph: input row of filter tap r = 0
  int iw0;       // q * sw - pw
  bool valid;    // m < M
};

FR_HD RowInfo a_row(const ConvShape& g, int64_t m, int64_t grp = 0) {
  RowInfo ri{0, 0, 0, false};
  if (m < g.rows()) {
    const int64_t pq = g.p * g.q;
    const int64_t img = m / pq;
    const int64_t rem = m - img * pq;
    const int64_t op = rem / g.q;
    const int64_t oq = rem - op * g.q;
    ri.base = img * g.h * g.w * g.c + grp * g.cg;
    ri.ih0 = static_cast<int>(op * g.sh - g.ph);
    ri.iw0 = static_cast<int>(oq * g.sw - g.pw);
    ri.valid = true;
  }
  return ri;
}

// Reduction index k -> (filter tap r, s; channel c within the group). k < KR < 2^31
// (checked by the launcher).
struct KInfo {
  int r, s, c;
  bool valid;  // k < KR
};

FR_HD KInfo k_decompose(const ConvShape& g, int k) {
  KInfo ki{0, 0, 0, false};
  const int cc = static_cast<int>(g.cg);
  if (static_cast<int64_t>(k) < g.red()) {
    const int rs = k / cc;
    ki.c = k - rs * cc;
    ki.r = rs / g.s;
    ki.s = rs - ki.r * g.s;
    ki.valid = true;
  }
  return ki;
}

// Global element offset of A[m][k..k+7] in x, or false when the vector is padding / out of
// range (the loader then zero-fills it: cp.async with src-size 0).
FR_HD bool a_offset(const ConvShape& g, const RowInfo& ri, const KInfo& ki, int64_t* off) {
  if (!ri.valid || !ki.valid) return false;
  const int ih = ri.ih0 + ki.r * g.dh;
  const int iw = ri.iw0 + ki.s * g.dw;
  if (ih < 0 || iw < 0 || ih >= g.h || iw >= g.w) return false;
  *off = ri.base + (static_cast<int64_t>(ih) * g.w + iw) * g.c + ki.c;
  return true;
}

// Global element offset of B^T row n (the group's output channel n, i.e. w[grp * Kg + n]) at
// reduction index k, or false (zero-fill).
FR_HD bool b_offset(const ConvShape& g, int64_t grp, int64_t n, int k, int64_t* off) {
  if (n >= g.kg || static_cast<int64_t>(k) >= g.red()) return false;
  *off = (grp * g.kg + n) * g.red() + k;
  return true;
}

// Grid dimension y enumerates (group, n-tile within the group): y = grp * n_tiles + tile with
// n_tiles = ceil(Kg / BN).
FR_HD int64_t n_tiles_per_group(const ConvShape& g, int bn) { return (g.kg + bn - 1) / bn; }

// Shared-memory tile [rows][kBK] of 16-bit units, 64 bytes a row, 16-byte vector `chunk`
// (0..3) stored at chunk ^ ((row >> 1) & 3). An ldmatrix phase reads one logical chunk of 8
// consecutive rows; their physical 16-byte units ((row & 1) * 4 + swizzled chunk within a
// 128-byte line) are then all different, i.e. the 8 rows hit all 32 banks once:
// conflict-free, and so are the loaders' 16-byte cp.async stores (4 threads a row).
FR_HD int swizzle(int row, int chunk) { return row * kBK + ((chunk ^ ((row >> 1) & 3)) * kVec); }

// Loader assignment: thread t copies 16-byte vector column (t & 3) of tile rows
// (t >> 2) + i * (threads / 4), i = 0, 1, ...
FR_HD int loader_chunk(int tid) { return tid & 3; }
FR_HD int loader_row(int tid, int i, int threads) { return (tid >> 2) + i * (threads / 4); }

// ldmatrix.x4 addresses. Lane l supplies the address of row (l & 7) of 8x8 matrix (l >> 3).
// A (16 x 16 at (m0, k0), row-major in smem): matrices 0..3 = (rows 0-7, k 0-7),
// (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15): exactly mma's a0a1, a2a3,
// a4a5, a6a7 registers.
FR_HD int ldsm_a_row(int lane) { return lane & 15; }
FR_HD int ldsm_a_chunk(int lane) { return lane >> 4; }
// The same addresses serve the TF32 kernel: an 8 x 8 b16 matrix is then 8 rows x 4 f32, lane
// l receiving element (l & 3) of row l >> 2, and matrices 0..3 = (rows 0-7, k 0-3),
// (rows 8-15, k 0-3), (rows 0-7, k 4-7), (rows 8-15, k 4-7) of a 16 x 8 f32 A tile are exactly
// m16n8k8 .tf32's a0, a1, a2, a3 (row groupID (+8 for a1, a3), column threadID_in_group (+4
// for a2, a3)); for B, (n 0-7, k 0-3) and (n 0-7, k 4-7) are its b0 (k = threadID_in_group)
// and b1 (k + 4), column n = groupID.
// B (two n8 tiles, 16 n x 16 k at (n0, k0); smem holds B^T, i.e. [n][k]): matrices 0..3 =
// (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = b0, b1 of n-tile 0,
// b0, b1 of n-tile 1 (non-transposed ldmatrix: a row of the [n][k] matrix is one n).
FR_HD int ldsm_b_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
FR_HD int ldsm_b_chunk(int lane) { return (lane >> 3) & 1; }

// Warp tiling of a CTA: warps_m x warps_n warps, warp w at rows (w % warps_m) * wm,
// columns (w / warps_m) * wn; each warp computes (wm / 16) x (wn / 8) mma tiles.
FR_HD int warp_row0(int warp, int warps_m, int wm) { return (warp % warps_m) * wm; }
FR_HD int warp_col0(int warp, int warps_m, int wn) { return (warp / warps_m) * wn; }

// Accumulator fragment of mma.m16n8k16 (f32 C/D): element e (0..3) of lane l sits at
// row (l >> 2) + 8 * (e >> 1), column 2 * (l & 3) + (e & 1) of the 16 x 8 tile.
FR_HD int acc_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
FR_HD int acc_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }

// Composed: smem offset in 16-bit units (within one stage's A or B tile) of the 16-byte row
// that `lane` hands to ldmatrix.x4 for A mma tile i of a warp at row wm0, 32-byte k-step kk
// (k16 of f16/bf16, k8 of f32); and for
// B n-tile pair j of a warp at column wn0.
FR_HD int ldsm_a_offset(int wm0, int i, int kk, int lane) {
  return swizzle(wm0 + i * 16 + ldsm_a_row(lane), kk * 2 + ldsm_a_chunk(lane));
}
FR_HD int ldsm_b_offset(int wn0, int j, int kk, int lane) {
  return swizzle(wn0 + j * 16 + ldsm_b_row(lane), kk * 2 + ldsm_b_chunk(lane));
}

// Epilogue copy-out: thread-strided index idx over the rows x (BN / vec) 16-byte vectors of
// the staged tile (vec = elements per vector: 8 for 16-bit, 4 for f32).
FR_HD int out_row(int idx, int bn, int vec = kVec) { return idx / (bn / vec); }
FR_HD int out_col(int idx, int bn, int vec = kVec) { return (idx % (bn / vec)) * vec; }

// Epilogue passes: the staged output tile [rows][BN + 8] must fit in the pipeline's 48 KiB.
// 16-bit outputs: one pass of all kBM rows (128 x 136 x 2 B = 34 KiB). f32 outputs: two passes
// of kBM / 2 rows (64 x 136 x 4 B = 34 KiB); in pass p, the warps whose rows lie in
// [p * kBM / 2, (p + 1) * kBM / 2) stage their accumulators (warp_row0 / (kBM / passes) == p).
FR_HD constexpr int epi_passes(int bytes) { return bytes == 4 ? 2 : 1; }

// conv_stats' per-chunk statistics over several epilogue passes: (cnt, mean, m2) accumulates
// one pass's two-pass (rows, mean_b, m2_b) by Chan's formula, in pass order (deterministic).
// The first pass (cnt == 0) is taken as it is, so one pass gives the plain two-pass result.
FR_HD void stats_merge(double* cnt, double* mean, double* m2, double rows, double mean_b,
                       double m2_b) {
  if (*cnt == 0.0) {
    *cnt = rows;
    *mean = mean_b;
    *m2 = m2_b;
    return;
  }
  const double n = *cnt + rows, delta = mean_b - *mean;
  *mean += delta * (rows / n);
  *m2 += m2_b + delta * delta * (*cnt * rows / n);
  *cnt = n;
}

}  // namespace igemm
}  // namespace cuda
}  // namespace fused_resnet
