// Host-only emulation of igemm.cu's data movement (no GPU, no CUDA toolkit needed):
// builds with any C++17 compiler, driven by tests/test_igemm_host.py.
//
// For each shape it runs every CTA of the grid through the kernel's own index functions
// (igemm_layout.cuh): the cp.async loaders fill an emulated shared memory (zero-fill where
// the predicate is false), the pipeline's stage rotation decides which buffer holds which
// k-tile, ldmatrix.x4 and mma.m16n8k16 are emulated from the PTX ISA's definitions (written
// down here independently of the kernel), and the epilogue places accumulators and copies the
// tile out through the kernel's mappings. Checked:
//   * every A / B fragment register element equals the independently computed im2col
//     A[m][k] / weight B[k][n] (0 for padding and out-of-range rows, columns, reductions);
//   * every ldmatrix phase (8 row addresses) touches 32 distinct banks, and each loader
//     phase (8 threads x 16 B) too;
//   * the emulated GEMM output equals a naive direct convolution exactly (small integers);
//   * 64-bit offsets for a tensor with more than 2^31 elements.
// Prints "OK <n> checks" and exits 0, or prints the first mismatch and exits 1.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "../igemm_layout.cuh"

namespace ig = fused_resnet::cuda::igemm;

namespace {

long long g_checks = 0;

#define CHECK(cond, ...)                                  \
  do {                                                    \
    ++g_checks;                                           \
    if (!(cond)) {                                        \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
      std::exit(1);                                       \
    }                                                     \
  } while (0)

struct Case {
  int n, c, h, w, k, r, s, sh, sw, ph, pw, dh, dw;
  int groups = 1;  // c and k are totals; c / groups and k / groups per group
};

// ---- PTX ISA definitions (independent of the kernel) ------------------------------------
// ldmatrix.sync.aligned.m8n8.x4.b16: threads 8j..8j+7 give the row addresses of matrix j;
// destination register j of thread l holds matrix j's row l / 4, 32-bit word l % 4 (b16
// elements 2 * (l % 4) + {0, 1}, or one f32 when the row holds 4 f32).
// mma.m16n8k16 .f16/.bf16 fragments (groupID = l >> 2, tig = l % 4):
//   A (16 x 16): a_i, i = 0..7, row = groupID + 8 * ((i / 2) % 2), col = 2 * tig + (i % 2) + 8 * (i / 4)
//   B (16 x 8):  b_i, i = 0..3, row (k) = 2 * tig + (i % 2) + 8 * (i / 2), col (n) = groupID
//   C (16 x 8):  c_i, i = 0..3, row = groupID + 8 * (i / 2), col = 2 * tig + (i % 2)
// Register r holds elements 2r (low half) and 2r + 1 (high half).
// mma.m16n8k8 .tf32 fragments (one element a register):
//   A (16 x 8): a_i, i = 0..3, row = groupID (a0, a2) or groupID + 8 (a1, a3),
//               col = tig (a0, a1) or tig + 4 (a2, a3)
//   B (8 x 8):  b_i, i = 0..1, row (k) = tig (b0) or tig + 4 (b1), col (n) = groupID
//   C: as m16n8k16.
void isa_a(int lane, int i, int* row, int* col) {
  *row = (lane >> 2) + 8 * ((i / 2) % 2);
  *col = 2 * (lane % 4) + (i % 2) + 8 * (i / 4);
}
void isa_b(int lane, int i, int* k, int* n) {
  *k = 2 * (lane % 4) + (i % 2) + 8 * (i / 2);
  *n = lane >> 2;
}
void isa_a_tf32(int lane, int i, int* row, int* col) {
  *row = (lane >> 2) + ((i == 1 || i == 3) ? 8 : 0);
  *col = (lane % 4) + ((i >= 2) ? 4 : 0);
}
void isa_b_tf32(int lane, int i, int* k, int* n) {
  *k = (lane % 4) + (i == 1 ? 4 : 0);
  *n = lane >> 2;
}
void isa_c(int lane, int i, int* row, int* col) {
  *row = (lane >> 2) + 8 * (i / 2);
  *col = 2 * (lane % 4) + (i % 2);
}

// 8 row addresses (in 16-bit units) of one ldmatrix phase: 32 distinct 4-byte banks?
bool conflict_free(const int* unit_offsets) {
  std::set<int> banks;
  for (int t = 0; t < 8; ++t)
    for (int b = 0; b < 4; ++b) banks.insert(((unit_offsets[t] * 2) / 4 + b) % 32);
  return banks.size() == 32;
}

// Emulated shared memory in 16-bit units. A f32 element occupies units (2i, 2i + 1): its value
// is kept in unit 2i and kHi marks unit 2i + 1, so reading a f32 at an odd unit is caught.
const float kHi = -7777.f;

// ldmatrix.x4 emulation: addr[lane] = unit offset of the row lane supplies; returns
// out[lane][reg][half] (half 1 unused for f32 rows).
template <int EB>
void ldmatrix_x4(const std::vector<float>& sm, int base, const int* addr, float out[32][4][2]) {
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j) {
      const int word = base + addr[8 * j + lane / 4] + 2 * (lane % 4);  // 32-bit word, in units
      if (EB == 2) {
        out[lane][j][0] = sm[word];
        out[lane][j][1] = sm[word + 1];
      } else {
        CHECK(word % 2 == 0 && sm[word + 1] == kHi, "f32 word at unit %d", word);
        out[lane][j][0] = sm[word];
        out[lane][j][1] = 0.f;
      }
    }
}

// ---- the emulation -------------------------------------------------------------------------
// EB: element bytes (2: f16/bf16 + mma.m16n8k16; 4: f32 + mma.m16n8k8 .tf32).
// prologue: conv_stats' input transform t(v) = relu(v * in_scale[c] + in_shift[c]) applied
// in shared memory to the loaded (not zero-filled) vectors; padding must stay 0.
template <int BN, int EB = 2>
void run_case(const Case& cs, unsigned seed, bool prologue = false) {
  using T = ig::Tile<BN>;
  constexpr int kWarpsM = T::kWarpsM, kWarpsN = T::kWarpsN, kStages = T::kStages;
  constexpr int kThreads = kWarpsM * kWarpsN * 32;
  constexpr int kWM = ig::kBM / kWarpsM, kWN = BN / kWarpsN;
  constexpr int kMT = kWM / 16, kNT = kWN / 8;
  constexpr int kATile = ig::kBM * ig::kBK, kBTile = BN * ig::kBK;  // 16-bit units
  constexpr int kAIters = ig::kBM * ig::kChunks / kThreads;
  constexpr int kBIters = BN * ig::kChunks / kThreads;
  constexpr int kV = ig::vec_elems(EB), kBKE = ig::bk_elems(EB), kU = EB / 2;
  constexpr int kKStep = EB == 2 ? 16 : 8;  // reduction elements of one 32-byte mma k-step
  constexpr int kPasses = ig::epi_passes(EB), kRowsP = ig::kBM / kPasses;
  const int cstride = BN + 8;
  CHECK(kRowsP * cstride * EB <= 48 * 1024 && kStages * (kATile + kBTile) * 2 <= 48 * 1024,
        "shared memory BN=%d EB=%d", BN, EB);

  const int cg = cs.c / cs.groups, kg = cs.k / cs.groups;
  ig::ConvShape g;
  g.n = cs.n; g.h = cs.h; g.w = cs.w; g.c = cs.c; g.k = cs.k; g.r = cs.r; g.s = cs.s;
  g.sh = cs.sh; g.sw = cs.sw; g.ph = cs.ph; g.pw = cs.pw; g.dh = cs.dh; g.dw = cs.dw;
  g.groups = cs.groups; g.cg = cg; g.kg = kg;
  g.p = (cs.h + 2 * cs.ph - (cs.dh * (cs.r - 1) + 1)) / cs.sh + 1;
  g.q = (cs.w + 2 * cs.pw - (cs.dw * (cs.s - 1) + 1)) / cs.sw + 1;
  const int64_t M = g.rows(), KR = g.red();
  CHECK(KR == static_cast<int64_t>(cs.r) * cs.s * cg, "reduction per group");

  // Inputs: small integers, so every float sum below is exact (and every value is exact in
  // TF32, so the f32 emulation needs no rounding model).
  std::srand(seed);
  std::vector<float> x(static_cast<size_t>(cs.n) * cs.h * cs.w * cs.c);
  std::vector<float> wt(static_cast<size_t>(cs.k) * cs.r * cs.s * cg);  // (K, R, S, C / groups)
  for (auto& v : x) v = static_cast<float>(std::rand() % 7 - 3);
  for (auto& v : wt) v = static_cast<float>(std::rand() % 5 - 2);
  std::vector<float> in_scale(cs.c), in_shift(cs.c);
  for (auto& v : in_scale) v = static_cast<float>(std::rand() % 3 == 0 ? -1 : std::rand() % 2 + 1);
  for (auto& v : in_shift) v = static_cast<float>(std::rand() % 3 - 1);
  auto t = [&](float v, int64_t c) -> float {  // c: global input channel
    if (!prologue) return v;
    const float u = v * in_scale[c] + in_shift[c];
    return u < 0.f ? 0.f : u;
  };

  // Independent im2col of group grp: A[m][k], B[k][n] straight from the convolution's
  // definition; the mma consumes the transformed input, 0 at padding / out of range.
  auto At = [&](int64_t m, int64_t k, int64_t grp, bool transformed) -> float {
    if (m >= M || k >= KR) return 0.f;
    const int64_t img = m / (g.p * g.q), p = (m / g.q) % g.p, q = m % g.q;
    const int64_t c = k % cg, s = (k / cg) % cs.s, r = k / (static_cast<int64_t>(cg) * cs.s);
    const int64_t ih = p * cs.sh - cs.ph + r * cs.dh, iw = q * cs.sw - cs.pw + s * cs.dw;
    if (ih < 0 || iw < 0 || ih >= cs.h || iw >= cs.w) return 0.f;
    const int64_t cc = grp * cg + c;
    const float v = x[((img * cs.h + ih) * cs.w + iw) * cs.c + cc];
    return transformed ? t(v, cc) : v;
  };
  auto B = [&](int64_t k, int64_t n, int64_t grp) -> float {  // n: channel within the group
    if (n >= kg || k >= KR) return 0.f;
    return wt[(grp * kg + n) * KR + k];  // (K, R, S, C / groups) dense: row grp*Kg + n
  };
  // Naive direct grouped convolution (loops over taps; no im2col) for the end-to-end check.
  std::vector<double> ref(static_cast<size_t>(M) * cs.k, 0.0);
  for (int64_t img = 0; img < cs.n; ++img)
    for (int64_t p = 0; p < g.p; ++p)
      for (int64_t q = 0; q < g.q; ++q)
        for (int n = 0; n < cs.k; ++n) {
          const int grp = n / kg;
          double acc = 0.0;
          for (int r = 0; r < cs.r; ++r)
            for (int s = 0; s < cs.s; ++s) {
              const int64_t ih = p * cs.sh - cs.ph + r * cs.dh, iw = q * cs.sw - cs.pw + s * cs.dw;
              if (ih < 0 || iw < 0 || ih >= cs.h || iw >= cs.w) continue;
              for (int c = 0; c < cg; ++c) {
                const int64_t cc = static_cast<int64_t>(grp) * cg + c;
                acc += static_cast<double>(t(x[((img * cs.h + ih) * cs.w + iw) * cs.c + cc], cc)) *
                       wt[((static_cast<int64_t>(n) * cs.r + r) * cs.s + s) * cg + c];
              }
            }
          ref[((img * g.p + p) * g.q + q) * cs.k + n] = acc;
        }

  std::vector<float> y(static_cast<size_t>(M) * cs.k, -12345.f);
  std::vector<float> smem(kStages * (kATile + kBTile));
  const int k_tiles = static_cast<int>((KR + kBKE - 1) / kBKE);
  const int64_t m_tiles = (M + ig::kBM - 1) / ig::kBM;
  const int64_t n_tiles = ig::n_tiles_per_group(g, BN);
  CHECK(n_tiles == (kg + BN - 1) / BN, "n tiles per group");

  for (int64_t bx = 0; bx < m_tiles; ++bx)
    for (int64_t by = 0; by < cs.groups * n_tiles; ++by) {
      // The kernel's blockIdx.y decomposition.
      const int64_t grp = by / n_tiles, n_block = (by - grp * n_tiles) * BN;
      const int64_t m_block = bx * ig::kBM;
      std::vector<int> stage_tile(kStages, -1);  // which k-tile each stage holds

      auto load_stage = [&](int stage, int kt) {
        const int base = stage * (kATile + kBTile);
        for (int tid = 0; tid < kThreads; ++tid) {
          const int lchunk = ig::loader_chunk(tid);
          const int k = kt * kBKE + lchunk * kV;
          const ig::KInfo ki = ig::k_decompose(g, k);
          for (int i = 0; i < kAIters; ++i) {
            const int row = ig::loader_row(tid, i, kThreads);
            const ig::RowInfo ri = ig::a_row(g, m_block + row, grp);
            int64_t off = 0;
            const bool ok = ig::a_offset(g, ri, ki, &off);
            const int dst = ig::swizzle(row, lchunk);
            CHECK(dst >= 0 && dst + 8 <= kATile && dst % 8 == 0, "A dst %d", dst);
            for (int e = 0; e < kV; ++e) {
              const float v = ok ? x[off + e] : 0.f;
              CHECK(v == At(m_block + row, k + e, grp, false), "A load m=%lld k=%d grp=%lld",
                    (long long)(m_block + row), k + e, (long long)grp);
              smem[base + dst + e * kU] = v;
              if (kU == 2) smem[base + dst + e * kU + 1] = kHi;
            }
          }
          for (int i = 0; i < kBIters; ++i) {
            const int row = ig::loader_row(tid, i, kThreads);
            int64_t off = 0;
            const bool ok = ig::b_offset(g, grp, n_block + row, k, &off);
            const int dst = ig::swizzle(row, lchunk);
            CHECK(dst >= 0 && dst + 8 <= kBTile && dst % 8 == 0, "B dst %d", dst);
            for (int e = 0; e < kV; ++e) {
              const float v = ok ? wt[off + e] : 0.f;
              CHECK(v == B(k + e, n_block + row, grp), "B load n=%lld k=%d", (long long)(n_block + row), k + e);
              smem[base + kATile + dst + e * kU] = v;
              if (kU == 2) smem[base + kATile + dst + e * kU + 1] = kHi;
            }
          }
        }
        // Loader bank check: each phase of 8 consecutive threads stores 8 x 16 B.
        for (int i = 0; i < kAIters; ++i)
          for (int t0 = 0; t0 < kThreads; t0 += 8) {
            int offs[8];
            for (int tt = 0; tt < 8; ++tt)
              offs[tt] = ig::swizzle(ig::loader_row(t0 + tt, i, kThreads), ig::loader_chunk(t0 + tt));
            CHECK(conflict_free(offs), "loader phase t0=%d", t0);
          }
        stage_tile[stage] = kt;
      };

      // Accumulators per warp / lane / tile / element, as in the kernel.
      std::vector<float> acc(static_cast<size_t>(kWarpsM * kWarpsN) * 32 * kMT * kNT * 4, 0.f);
      auto acc_at = [&](int warp, int lane, int i, int j, int e) -> float& {
        return acc[((((static_cast<size_t>(warp) * 32 + lane) * kMT + i) * kNT + j) * 4) + e];
      };

      // The kernel's pipeline order: prologue stages 0..S-2, then per kt: prefetch kt+S-1 into
      // (kt+S-1) % S (the stage read at kt-1), compute kt from kt % S.
      for (int s = 0; s < kStages - 1; ++s)
        if (s < k_tiles) load_stage(s, s);
      for (int kt = 0; kt < k_tiles; ++kt) {
        const int pre = kt + kStages - 1;
        if (pre < k_tiles) {
          CHECK(pre % kStages != kt % kStages, "prefetch overwrites the stage being read");
          load_stage(pre % kStages, pre);
        }
        const int stage = kt % kStages;
        CHECK(stage_tile[stage] == kt, "stage %d holds tile %d, expected %d", stage, stage_tile[stage], kt);
        const int abase = stage * (kATile + kBTile), bbase = abase + kATile;
        if (prologue) {  // the kernel's in-place transform: each thread its own copied vectors
          for (int tid = 0; tid < kThreads; ++tid) {
            const int lchunk = ig::loader_chunk(tid);
            const ig::KInfo ki = ig::k_decompose(g, kt * kBKE + lchunk * kV);
            if (!ki.valid) continue;
            for (int i = 0; i < kAIters; ++i) {
              int64_t off = 0;
              if (!ig::a_offset(g, ig::a_row(g, m_block + ig::loader_row(tid, i, kThreads), grp), ki, &off)) continue;
              float* v = &smem[abase + ig::swizzle(ig::loader_row(tid, i, kThreads), lchunk)];
              // global channel, as the kernel's grp * Cg + ki.c
              for (int e = 0; e < kV; ++e) v[e * kU] = t(v[e * kU], grp * cg + ki.c + e);
            }
          }
        }
        for (int warp = 0; warp < kWarpsM * kWarpsN; ++warp) {
          const int wm0 = ig::warp_row0(warp, kWarpsM, kWM), wn0 = ig::warp_col0(warp, kWarpsM, kWN);
          for (int kk = 0; kk < ig::kBK / 16; ++kk) {
            const int64_t k0 = static_cast<int64_t>(kt) * kBKE + kk * kKStep;
            static float af[kMT][32][4][2], bf[kNT][32][2][2];
            for (int i = 0; i < kMT; ++i) {
              int addr[32];
              for (int l = 0; l < 32; ++l) addr[l] = ig::ldsm_a_offset(wm0, i, kk, l);
              for (int j = 0; j < 4; ++j) CHECK(conflict_free(addr + 8 * j), "A ldmatrix phase %d", j);
              ldmatrix_x4<EB>(smem, abase, addr, af[i]);
              for (int l = 0; l < 32; ++l)
                for (int e = 0; e < (EB == 2 ? 8 : 4); ++e) {
                  int row, col;
                  float got;
                  if (EB == 2) {
                    isa_a(l, e, &row, &col);
                    got = af[i][l][e / 2][e % 2];
                  } else {
                    isa_a_tf32(l, e, &row, &col);
                    got = af[i][l][e][0];
                  }
                  const int64_t m = m_block + wm0 + i * 16 + row;
                  CHECK(got == At(m, k0 + col, grp, true), "A fragment warp %d lane %d elem %d", warp, l, e);
                }
            }
            for (int j = 0; j < kNT / 2; ++j) {
              int addr[32];
              float r[32][4][2];
              for (int l = 0; l < 32; ++l) addr[l] = ig::ldsm_b_offset(wn0, j, kk, l);
              for (int q = 0; q < 4; ++q) CHECK(conflict_free(addr + 8 * q), "B ldmatrix phase %d", q);
              ldmatrix_x4<EB>(smem, bbase, addr, r);
              for (int l = 0; l < 32; ++l)
                for (int h = 0; h < 2; ++h) {  // the kernel's register order: r0,r1 -> tile 2j; r2,r3 -> 2j+1
                  bf[2 * j][l][0][h] = r[l][0][h];
                  bf[2 * j][l][1][h] = r[l][1][h];
                  bf[2 * j + 1][l][0][h] = r[l][2][h];
                  bf[2 * j + 1][l][1][h] = r[l][3][h];
                }
            }
            for (int j = 0; j < kNT; ++j)
              for (int l = 0; l < 32; ++l)
                for (int e = 0; e < (EB == 2 ? 4 : 2); ++e) {
                  int kr, n;
                  float got;
                  if (EB == 2) {
                    isa_b(l, e, &kr, &n);
                    got = bf[j][l][e / 2][e % 2];
                  } else {
                    isa_b_tf32(l, e, &kr, &n);
                    got = bf[j][l][e][0];
                  }
                  CHECK(got == B(k0 + kr, n_block + wn0 + j * 8 + n, grp), "B fragment warp %d lane %d elem %d",
                        warp, l, e);
                }
            // mma: D = A * B + C with the ISA's fragment ownership (m16n8k16 or m16n8k8).
            for (int i = 0; i < kMT; ++i)
              for (int j = 0; j < kNT; ++j) {
                float Am[16][16], Bm[16][8];
                for (int l = 0; l < 32; ++l) {
                  if (EB == 2) {
                    for (int e = 0; e < 8; ++e) {
                      int row, col;
                      isa_a(l, e, &row, &col);
                      Am[row][col] = af[i][l][e / 2][e % 2];
                    }
                    for (int e = 0; e < 4; ++e) {
                      int kr, n;
                      isa_b(l, e, &kr, &n);
                      Bm[kr][n] = bf[j][l][e / 2][e % 2];
                    }
                  } else {
                    for (int e = 0; e < 4; ++e) {
                      int row, col;
                      isa_a_tf32(l, e, &row, &col);
                      Am[row][col] = af[i][l][e][0];
                    }
                    for (int e = 0; e < 2; ++e) {
                      int kr, n;
                      isa_b_tf32(l, e, &kr, &n);
                      Bm[kr][n] = bf[j][l][e][0];
                    }
                  }
                }
                for (int l = 0; l < 32; ++l)
                  for (int e = 0; e < 4; ++e) {
                    int row, col;
                    isa_c(l, e, &row, &col);
                    float sum = 0.f;
                    for (int q = 0; q < kKStep; ++q) sum += Am[row][q] * Bm[q][col];
                    acc_at(warp, l, i, j, e) += sum;
                  }
              }
          }
        }
      }

      // Epilogue: per pass, the warps of that pass stage their fragments by the kernel's
      // acc_row / acc_col (checked against the ISA's C layout), then the 16-byte copy-out.
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 4; ++e) {
          int row, col;
          isa_c(l, e, &row, &col);
          CHECK(ig::acc_row(l, e) == row && ig::acc_col(l, e) == col, "acc mapping lane %d e %d", l, e);
        }
      std::vector<int> staged(static_cast<size_t>(ig::kBM) * BN, 0);
      for (int pass = 0; pass < kPasses; ++pass) {
        std::vector<float> ctile(static_cast<size_t>(kRowsP) * cstride, -999.f);
        for (int warp = 0; warp < kWarpsM * kWarpsN; ++warp) {
          const int wm0 = ig::warp_row0(warp, kWarpsM, kWM), wn0 = ig::warp_col0(warp, kWarpsM, kWN);
          if (wm0 / kRowsP != pass) continue;
          for (int i = 0; i < kMT; ++i)
            for (int j = 0; j < kNT; ++j)
              for (int l = 0; l < 32; ++l)
                for (int e = 0; e < 4; ++e) {
                  const int row = wm0 + i * 16 + ig::acc_row(l, e), col = wn0 + j * 8 + ig::acc_col(l, e);
                  CHECK(row - pass * kRowsP >= 0 && row - pass * kRowsP < kRowsP, "pass %d row %d", pass, row);
                  ctile[(row - pass * kRowsP) * cstride + col] = acc_at(warp, l, i, j, e);
                  ++staged[row * BN + col];
                }
        }
        std::vector<int> written(static_cast<size_t>(kRowsP) * BN, 0);
        for (int idx = 0; idx < kRowsP * (BN / kV); ++idx) {
          const int row = ig::out_row(idx, BN, kV), col = ig::out_col(idx, BN, kV);
          CHECK(row < kRowsP && col + kV <= BN && col % kV == 0, "copy-out idx %d", idx);
          const int64_t m = m_block + pass * kRowsP + row, nl = n_block + col;
          for (int e = 0; e < kV; ++e) ++written[row * BN + col + e];
          if (m < M && nl < kg)
            for (int e = 0; e < kV; ++e) y[m * cs.k + grp * kg + nl + e] = ctile[row * cstride + col + e];
        }
        for (int v : written) CHECK(v == 1, "copy-out covers each tile element once");
      }
      for (int v : staged) CHECK(v == 1, "every accumulator staged exactly once");
    }

  for (int64_t m = 0; m < M; ++m)
    for (int n = 0; n < cs.k; ++n)
      CHECK(static_cast<double>(y[m * cs.k + n]) == ref[m * cs.k + n], "y[m=%lld][n=%d] = %g, conv %g",
            (long long)m, n, y[m * cs.k + n], ref[m * cs.k + n]);
}

// Offsets past 2^31: the last pixel of a 1024 x 64 x 224 x 224 input (3.3e9 elements).
void check_64bit() {
  ig::ConvShape g;
  g.n = 1024; g.h = 224; g.w = 224; g.c = 64; g.k = 64; g.r = 3; g.s = 3;
  g.sh = 1; g.sw = 1; g.ph = 1; g.pw = 1; g.dh = 1; g.dw = 1; g.p = 224; g.q = 224;
  g.groups = 1; g.cg = 64; g.kg = 64;
  const int64_t m = g.rows() - 1;  // image 1023, pixel (223, 223)
  const ig::RowInfo ri = ig::a_row(g, m);
  const int k = (1 * 3 + 0) * 64 + 56;  // tap (r=1, s=0), channel 56 -> input (223, 222)
  const ig::KInfo ki = ig::k_decompose(g, k);
  int64_t off = 0;
  CHECK(ig::a_offset(g, ri, ki, &off), "in-image tap");
  const int64_t expect = ((int64_t{1023} * 224 + 223) * 224 + 222) * 64 + 56;
  CHECK(off == expect && off > (int64_t{1} << 31), "64-bit offset %lld != %lld", (long long)off,
        (long long)expect);
  const ig::KInfo ki2 = ig::k_decompose(g, (2 * 3 + 2) * 64);  // (r=2, s=2): row 224 = padding
  CHECK(!ig::a_offset(g, ri, ki2, &off), "bottom-right padding tap");
  CHECK(!ig::a_row(g, g.rows()).valid, "row M is out of range");
}

// conv_stats' chunk statistics: the f32 kernel's two 64-row passes merged by stats_merge must
// equal the two-pass statistics of the whole 128-row chunk (what the 16-bit kernel computes),
// for every chunk height 1..128 (partial last chunks), including |mean| >> std.
void check_stats_merge() {
  std::srand(99);
  for (int rows = 1; rows <= ig::kBM; ++rows)
    for (double offset : {0.0, 1e4}) {
      std::vector<double> z(rows);
      for (auto& v : z) v = offset + static_cast<double>(std::rand() % 2001 - 1000) / 37.0;
      auto two_pass = [&](int r0, int r1, double* mean, double* m2) {
        double s = 0.0;
        for (int r = r0; r < r1; ++r) s += z[r];
        *mean = s / (r1 - r0);
        *m2 = 0.0;
        for (int r = r0; r < r1; ++r) *m2 += (z[r] - *mean) * (z[r] - *mean);
      };
      double mean_all, m2_all;
      two_pass(0, rows, &mean_all, &m2_all);
      double cnt = 0.0, mean = 0.0, m2 = 0.0;
      const int half = ig::kBM / ig::epi_passes(4);
      for (int pass = 0; pass < ig::epi_passes(4); ++pass) {  // as the kernel: skip empty passes
        const int r0 = pass * half, r1 = rows < r0 + half ? rows : r0 + half;
        if (r1 <= r0) continue;
        double mb, m2b;
        two_pass(r0, r1, &mb, &m2b);
        ig::stats_merge(&cnt, &mean, &m2, r1 - r0, mb, m2b);
      }
      CHECK(cnt == rows, "merged count %g != %d", cnt, rows);
      CHECK(std::fabs(mean - mean_all) <= 1e-12 * std::fabs(mean_all) + 1e-12, "mean rows=%d", rows);
      CHECK(std::fabs(m2 - m2_all) <= 1e-9 * m2_all + 1e-12, "M2 rows=%d: %.17g vs %.17g", rows, m2, m2_all);
    }
}

}  // namespace

int main() {
  check_64bit();
  check_stats_merge();
  // n, c, h, w, k, r, s, sh, sw, ph, pw, dh, dw[, groups]
  const Case small_k[] = {
      {2, 16, 9, 9, 24, 3, 3, 1, 1, 1, 1, 1, 1},   // C < kBK: k-tiles span taps; K=24 partial tile
      {3, 8, 7, 5, 16, 3, 3, 2, 2, 1, 1, 1, 1},    // stride 2, odd H, 5 wide, C=8
      {1, 24, 11, 10, 8, 3, 3, 1, 1, 2, 2, 2, 2},  // dilation 2, padding 2, C=24 (odd vector count)
      {2, 8, 15, 15, 64, 7, 7, 2, 2, 3, 3, 1, 1},  // 7x7 stride 2 pad 3 (stem-like, C padded to 8)
      {1, 32, 6, 9, 40, 1, 3, 1, 2, 0, 1, 1, 1},   // rectangular filter and stride
  };
  const Case big_k[] = {
      {2, 64, 8, 8, 128, 1, 1, 2, 2, 0, 0, 1, 1},  // 1x1 stride 2 (projection shortcut)
      {1, 32, 9, 7, 200, 3, 3, 1, 1, 1, 1, 2, 1},  // K=200: two n-tiles, the second partial
      {2, 40, 12, 12, 136, 3, 3, 1, 1, 1, 1, 1, 1},  // M = 288: partial m-tile; KR=360 partial k-tile
  };
  // Grouped (ResNeXt-like): one GEMM per group; tiles chosen by K / groups.
  const Case grouped64[] = {
      {2, 64, 9, 9, 64, 3, 3, 1, 1, 1, 1, 1, 1, 8},     // Cg = Kg = 8: 64-tile mostly empty
      {1, 96, 11, 7, 64, 3, 3, 2, 2, 1, 1, 1, 1, 4},    // Cg = 24 (KR = 216: partial k-tile), Kg = 16, s2 odd
      {3, 64, 5, 6, 128, 3, 3, 1, 1, 1, 1, 2, 2, 2},    // Kg = 64 (full 64-tile), dilation 2, M = 90
  };
  // Cg = Kg = 4 (resnext50_32x4d's first stage width): 4-element vectors, so float32 only.
  const Case grouped_f32 = {1, 128, 6, 6, 128, 3, 3, 1, 1, 1, 1, 1, 1, 32};
  const Case grouped128[] = {
      {2, 256, 5, 5, 400, 3, 3, 1, 1, 1, 1, 1, 1, 2},   // Kg = 200: two 128-tiles, second partial
  };
  unsigned seed = 1;
  for (const Case& c : small_k) run_case<64>(c, seed++);
  for (const Case& c : big_k) run_case<128>(c, seed++);
  // The tile choice is by K only; each config must also be right for the other's shapes.
  run_case<128>(small_k[0], seed++);
  run_case<64>(big_k[1], seed++);
  // conv_stats' fused prologue: padding must stay 0 after relu(x * scale + shift).
  run_case<64>(small_k[0], seed++, true);
  run_case<64>(small_k[2], seed++, true);
  run_case<128>(big_k[2], seed++, true);
  // Groups, 16-bit elements (Cg, Kg multiples of 8).
  for (int i = 0; i < 3; ++i) run_case<64>(grouped64[i], seed++);
  run_case<64>(grouped64[1], seed++, true);  // prologue: global channel indices per group
  run_case<128>(grouped128[0], seed++);
  run_case<128>(grouped64[2], seed++);
  // float32 / TF32 (4-element vectors, 16-element k-tiles, m16n8k8, two epilogue passes).
  run_case<64, 4>(small_k[0], seed++);
  run_case<64, 4>(small_k[2], seed++, true);
  run_case<128, 4>(big_k[2], seed++);
  run_case<128, 4>(big_k[1], seed++, true);
  run_case<64, 4>(grouped64[1], seed++);
  run_case<64, 4>(grouped_f32, seed++);
  run_case<128, 4>(grouped128[0], seed++, true);
  std::printf("OK %lld checks\n", g_checks);
  return 0;
}
