// Tensor-core implicit-GEMM convolution over NHWC for float16 / bfloat16 (float32
// accumulation) and float32 through TF32 (mma.m16n8k8 .tf32, operands rounded by
// cvt.rna.tf32.f32; the caller runs it only when torch allows TF32 for convolutions), with
// conv_bn_act's epilogue and conv_stats' statistics epilogue fused, and groups (one GEMM per
// group: gridDim.y enumerates (group, n-tile)).
// UNVALIDATED ON HARDWARE: see igemm.cuh and csrc/README.md.
//
// GEMM view and index math: igemm_layout.cuh. Per CTA (one tile of kBM = 128 output pixels
// x BN output channels):
//   * main loop over the reduction in kBK = 32 steps; operands go global -> shared memory by
//     16-byte cp.async.cg copies (one predicate per vector; padding and out-of-range rows /
//     channels are zero-filled through the src-size operand), STAGES-deep pipeline
//     (cp.async.commit_group / wait_group, one __syncthreads per step);
//   * shared memory tiles are [rows][32] 16-bit elements with an XOR swizzle of the 16-byte
//     vectors (igemm::swizzle) so ldmatrix and the cp.async stores are bank-conflict free;
//   * fragments by ldmatrix.x4 (A: 16x16 row-major; B: two n8 tiles of the [n][k] weight),
//     math by mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} -- warps of 64 x 32 outputs
//     (4 x 4 mma tiles, 64 float accumulators a thread);
//   * conv_stats' prologue (optional, runtime flag): after a stage lands, each thread applies
//     relu?(x * in_scale[c] + in_shift[c]) (float FMA, rounded to the dtype, as the separate
//     affine_act pass would) to the A vectors it copied, skipping zero-filled ones, so padding
//     is 0 after the transform; one extra __syncthreads per k-step on that path only;
//   * epilogue: acc * scale + shift (+ residual) (+ ReLU) in float, rounded once to the dtype,
//     staged through shared memory (the pipeline buffers, reused) and written with 16-byte
//     stores; for conv_stats the staged rounded z tile also yields per-channel two-pass
//     (mean, M2) partials in double for this 128-row chunk (no atomics; merged by
//     kernels.cu's channel_stats_merge in a fixed order).
// Two tile configurations, chosen by K / groups: BN = 128 (8 warps, 3 stages) and BN = 64 for
// K / groups <= 64 (4 warps, 4 stages). Static shared memory <= 48 KiB, so no opt-in attribute
// is needed. The shared-memory byte layout is the same for every dtype (64-byte tile rows:
// 32 f16/bf16 or 16 f32 reduction elements); f32 outputs are staged in two 64-row passes.
// Epilogue variants are runtime flags (few instantiations: 3 dtypes x 2 tiles).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "igemm.cuh"
#include "igemm_layout.cuh"

namespace fused_resnet {
namespace cuda {
namespace {

using igemm::ConvShape;
using igemm::kBK;
using igemm::kBM;
using igemm::kVec;

struct Args {
  ConvShape g;
  const void* x;
  const void* w;
  void* y;
  const float* scale;     // null: no affine (conv_stats)
  const float* shift;
  const void* residual;
  double* ws;             // non-null: write statistics partials
  bool relu;
  // conv_stats' prologue: x -> relu?(x * in_scale[c] + in_shift[c]) rounded to the dtype,
  // applied to the A tile in shared memory; padding stays 0 (after the transform).
  bool prologue;
  const float* in_scale;  // null: 1
  const float* in_shift;  // null: 0
  bool in_relu;
};

// ---- dtype plumbing: E is the storage type (uint16_t for f16/bf16 bits, float) ----------
template <typename T>
struct Bits;
template <>
struct Bits<__half> {
  using E = uint16_t;
  static __device__ __forceinline__ float to_float(E b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ E from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
template <>
struct Bits<__nv_bfloat16> {
  using E = uint16_t;
  static __device__ __forceinline__ float to_float(E b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __device__ __forceinline__ E from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};
template <>
struct Bits<float> {  // float32 activations, TF32 tensor-core math
  using E = float;
  static __device__ __forceinline__ float to_float(E b) { return b; }
  static __device__ __forceinline__ E from_float(float v) { return v; }
};

// ---- PTX wrappers (sm_80+) -------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// One 32-byte k-step of a 16 x 8 tile: A in 4 registers, B in 2, whatever the type.
//   f16 / bf16: mma.m16n8k16 (k16 = 32 bytes); the registers as ldmatrix gave them.
//   f32: mma.m16n8k8 .tf32 (k8 = 32 bytes); every operand register is first rounded to TF32
//   by cvt.rna.tf32.f32 (round to nearest, ties away from zero; the tensor core would
//   otherwise just ignore the low 13 mantissa bits, i.e. truncate) -- relative error
//   <= 2^-11 per operand, the bound the GPU tests derive theirs from.
template <typename T>
__device__ __forceinline__ void mma_step(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma_step<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma_step<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ uint32_t to_tf32(uint32_t v) {
  uint32_t r = v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(__uint_as_float(v)));
#endif
  return r;
}
template <>
__device__ __forceinline__ void mma_step<float>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(to_tf32(a[0])), "r"(to_tf32(a[1])), "r"(to_tf32(a[2])), "r"(to_tf32(a[3])),
        "r"(to_tf32(b0)), "r"(to_tf32(b1)));
#endif
}

// A pair of consecutive output elements: residual load and staged-tile store.
template <typename E>
struct Pair;
template <>
struct Pair<uint16_t> {
  static __device__ __forceinline__ void load(const uint16_t* p, uint16_t& a, uint16_t& b) {
    const uint32_t v = *reinterpret_cast<const uint32_t*>(p);
    a = static_cast<uint16_t>(v & 0xffffu);
    b = static_cast<uint16_t>(v >> 16);
  }
  static __device__ __forceinline__ void store(uint16_t* p, uint16_t a, uint16_t b) {
    *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
  }
};
template <>
struct Pair<float> {
  static __device__ __forceinline__ void load(const float* p, float& a, float& b) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    a = v.x;
    b = v.y;
  }
  static __device__ __forceinline__ void store(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  }
};

using igemm::Tile;

template <typename T, int BN>
__global__ void __launch_bounds__(Tile<BN>::kWarpsM* Tile<BN>::kWarpsN * 32, 1)
    igemm_kernel(const Args a) {
  using E = typename Bits<T>::E;
  constexpr int kEB = static_cast<int>(sizeof(E));            // element bytes
  constexpr int kV = igemm::vec_elems(kEB);                     // elements per 16-byte vector
  constexpr int kBKE = igemm::bk_elems(kEB);                    // reduction elements per k-tile
  constexpr int kU = kEB / 2;                                   // 16-bit units per element
  constexpr int kWarpsM = Tile<BN>::kWarpsM, kWarpsN = Tile<BN>::kWarpsN;
  constexpr int kStages = Tile<BN>::kStages;
  constexpr int kThreads = kWarpsM * kWarpsN * 32;
  constexpr int kWM = kBM / kWarpsM, kWN = BN / kWarpsN;  // 64 x 32 per warp
  constexpr int kMT = kWM / 16, kNT = kWN / 8;            // mma tiles per warp
  constexpr int kATile = kBM * kBK, kBTile = BN * kBK;    // 16-bit units per stage
  constexpr int kAIters = kBM * igemm::kChunks / kThreads;
  constexpr int kBIters = BN * igemm::kChunks / kThreads;
  constexpr int kPasses = igemm::epi_passes(kEB);
  constexpr int kRowsP = kBM / kPasses;                   // staged rows per epilogue pass
  constexpr int kCStride = BN + 8;  // epilogue tile row stride (elements): conflict-free
  constexpr int kPipe = kStages * (kATile + kBTile);
  constexpr int kEpi = kRowsP * kCStride * kU;
  constexpr int kSmem = kPipe > kEpi ? kPipe : kEpi;
  static_assert(kSmem * 2 <= 48 * 1024, "static shared memory limit");
  static_assert(kAIters * kThreads == kBM * igemm::kChunks, "A loader covers the tile");
  static_assert(kBIters * kThreads == BN * igemm::kChunks, "B loader covers the tile");
  static_assert(kNT % 2 == 0, "B fragments come in pairs of n8 tiles");
  static_assert(BN <= kThreads, "one statistics column per thread");
  static_assert(kPasses == 1 || kPasses == kWarpsM, "an epilogue pass is one warp row");
  __shared__ __align__(128) uint16_t smem[kSmem];

  const ConvShape& g = a.g;
  const E* __restrict__ xp = static_cast<const E*>(a.x);
  const E* __restrict__ wp = static_cast<const E*>(a.w);
  E* __restrict__ yp = static_cast<E*>(a.y);
  const E* __restrict__ rp = static_cast<const E*>(a.residual);
  const int tid = threadIdx.x;
  const int64_t m_block = static_cast<int64_t>(blockIdx.x) * kBM;
  // blockIdx.y = group * n_tiles + n-tile within the group (igemm::n_tiles_per_group).
  const int64_t n_tiles = igemm::n_tiles_per_group(g, BN);
  const int64_t grp = static_cast<int64_t>(blockIdx.y) / n_tiles;
  const int64_t n_block = (static_cast<int64_t>(blockIdx.y) - grp * n_tiles) * BN;  // in group
  const int64_t n_glob0 = grp * g.kg;  // the group's first output channel
  const int64_t M = g.rows();
  const int KR = static_cast<int>(g.red());

  // Loader state: this thread's rows of A (output pixels) and of B^T (output channels).
  const int lchunk = igemm::loader_chunk(tid);
  igemm::RowInfo arow[kAIters];
#pragma unroll
  for (int i = 0; i < kAIters; ++i)
    arow[i] = igemm::a_row(g, m_block + igemm::loader_row(tid, i, kThreads), grp);

  auto load_stage = [&](int stage, int kt) {
    uint16_t* as = smem + stage * (kATile + kBTile);
    uint16_t* bs = as + kATile;
    const int k = kt * kBKE + lchunk * kV;
    const igemm::KInfo ki = igemm::k_decompose(g, k);
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      int64_t off = 0;
      const bool ok = igemm::a_offset(g, arow[i], ki, &off);
      const int row = igemm::loader_row(tid, i, kThreads);
      cp_async16(smem_u32(as + igemm::swizzle(row, lchunk)), xp + off, ok);
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int row = igemm::loader_row(tid, i, kThreads);
      int64_t off = 0;
      const bool ok = igemm::b_offset(g, grp, n_block + row, k, &off);
      cp_async16(smem_u32(bs + igemm::swizzle(row, lchunk)), wp + off, ok);
    }
  };

  const int warp = tid >> 5, lane = tid & 31;
  const int wm0 = igemm::warp_row0(warp, kWarpsM, kWM);
  const int wn0 = igemm::warp_col0(warp, kWarpsM, kWN);

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int k_tiles = (KR + kBKE - 1) / kBKE;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();  // always commit: group counting stays uniform
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (for this thread's copies) ...
    __syncthreads();               // ... and for everyone's; stage (kt-1) % S is free again
    const int pre = kt + kStages - 1;
    if (pre < k_tiles) load_stage(pre % kStages, pre);
    cp_async_commit();

    if (a.prologue) {
      // Each thread transforms the A vectors it copied itself (its cp.async writes are
      // visible to it after wait_group); zero-filled vectors (padding, rows >= M, k >= KR)
      // are skipped, so padding is 0 after the transform, as the contract says. Channels are
      // global (group * Cg + c): in_scale / in_shift are per input channel of x.
      uint16_t* aw = smem + (kt % kStages) * (kATile + kBTile);
      const int k = kt * kBKE + lchunk * kV;
      const igemm::KInfo ki = igemm::k_decompose(g, k);
      if (ki.valid) {
        const int64_t c0 = grp * g.cg + ki.c;
        float sc[kV], sf[kV];
#pragma unroll
        for (int e = 0; e < kV; ++e) {
          sc[e] = a.in_scale != nullptr ? __ldg(a.in_scale + c0 + e) : 1.f;
          sf[e] = a.in_shift != nullptr ? __ldg(a.in_shift + c0 + e) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < kAIters; ++i) {
          int64_t off = 0;
          if (!igemm::a_offset(g, arow[i], ki, &off)) continue;
          uint4* vp = reinterpret_cast<uint4*>(
              aw + igemm::swizzle(igemm::loader_row(tid, i, kThreads), lchunk));
          uint4 v = *vp;
          E* ev = reinterpret_cast<E*>(&v);
#pragma unroll
          for (int e = 0; e < kV; ++e) {
            float t = __fmaf_rn(Bits<T>::to_float(ev[e]), sc[e], sf[e]);
            if (a.in_relu) t = t < 0.f ? 0.f : t;
            ev[e] = Bits<T>::from_float(t);
          }
          *vp = v;
        }
      }
      __syncthreads();  // the whole tile is transformed before any warp reads it
    }

    const uint16_t* as = smem + (kt % kStages) * (kATile + kBTile);
    const uint16_t* bs = as + kATile;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {  // 32-byte k-steps: k16 (16-bit) or k8 (TF32)
      uint32_t af[kMT][4];
      uint32_t bf[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        ldmatrix_x4(af[i], smem_u32(as + igemm::ldsm_a_offset(wm0, i, kk, lane)));
      }
#pragma unroll
      for (int j = 0; j < kNT / 2; ++j) {
        uint32_t r[4];
        ldmatrix_x4(r, smem_u32(bs + igemm::ldsm_b_offset(wn0, j, kk, lane)));
        bf[2 * j][0] = r[0];
        bf[2 * j][1] = r[1];
        bf[2 * j + 1][0] = r[2];
        bf[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma_step<T>(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // pipeline buffers become the epilogue tile

  E* cs = reinterpret_cast<E*>(smem);
  const bool affine = a.scale != nullptr;
  // conv_stats: this thread's column (col = tid < BN) accumulates (count, mean, M2) over the
  // passes; one pass: the two-pass (mean, M2) of the tile; two passes: each half two-pass,
  // merged by Chan's formula (fixed order: deterministic).
  const int64_t stat_n = n_block + tid;
  const bool stat_col = a.ws != nullptr && tid < BN && stat_n < g.kg;
  double st_cnt = 0.0, st_mean = 0.0, st_m2 = 0.0;

#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    const int64_t m_pass = m_block + pass * kRowsP;
    // ---- epilogue 1: fragments -> (affine, residual, ReLU) -> rounded -> smem tile --------
    if (wm0 / kRowsP == pass) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int col = wn0 + j * 8 + igemm::acc_col(lane, 0);  // even; col + 1 is its pair
        const int64_t nl = n_block + col;                        // channel within the group
        const bool n_ok = nl < g.kg;  // Kg % 2 == 0: nl + 1 < Kg too
        const int64_t n = n_glob0 + nl;                          // global output channel
        float sc0 = 1.f, sc1 = 1.f, sh0 = 0.f, sh1 = 0.f;
        if (affine && n_ok) {
          sc0 = a.scale[n];
          sc1 = a.scale[n + 1];
          sh0 = a.shift[n];
          sh1 = a.shift[n + 1];
        }
#pragma unroll
        for (int i = 0; i < kMT; ++i) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = wm0 + i * 16 + igemm::acc_row(lane, 2 * h);  // row in the CTA tile
            float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
            if (affine) {
              v0 = __fmaf_rn(v0, sc0, sh0);
              v1 = __fmaf_rn(v1, sc1, sh1);
            }
            const int64_t m = m_block + row;
            if (rp != nullptr && n_ok && m < M) {
              E r0, r1;
              Pair<E>::load(rp + m * g.k + n, r0, r1);
              v0 += Bits<T>::to_float(r0);
              v1 += Bits<T>::to_float(r1);
            }
            if (a.relu) {
              v0 = v0 < 0.f ? 0.f : v0;  // NaN propagates, as torch.relu
              v1 = v1 < 0.f ? 0.f : v1;
            }
            Pair<E>::store(cs + (row - pass * kRowsP) * kCStride + col, Bits<T>::from_float(v0),
                           Bits<T>::from_float(v1));
          }
        }
      }
    }
    __syncthreads();

    // ---- epilogue 2: smem tile -> global, 16-byte vectors ----------------------------------
    constexpr int kVecsPerRow = BN / kV;
#pragma unroll 4
    for (int idx = tid; idx < kRowsP * kVecsPerRow; idx += kThreads) {
      const int row = igemm::out_row(idx, BN, kV);
      const int col = igemm::out_col(idx, BN, kV);
      const int64_t m = m_pass + row;
      const int64_t nl = n_block + col;
      if (m < M && nl < g.kg)  // Kg % vec == 0: the whole vector is in the group
        *reinterpret_cast<uint4*>(yp + m * g.k + n_glob0 + nl) =
            *reinterpret_cast<const uint4*>(cs + row * kCStride + col);
    }

    // ---- epilogue 3 (conv_stats): per-channel two-pass (mean, M2) of this pass's rows -----
    if (stat_col) {
      const int64_t left = M - m_pass;
      const int rows = static_cast<int>(left < 0 ? 0 : (left < kRowsP ? left : kRowsP));
      if (rows > 0) {
        double sum = 0.0;
        for (int r = 0; r < rows; ++r) sum += Bits<T>::to_float(cs[r * kCStride + tid]);
        const double mean = sum / rows;
        double m2 = 0.0;
        for (int r = 0; r < rows; ++r) {
          const double d = Bits<T>::to_float(cs[r * kCStride + tid]) - mean;
          m2 += d * d;
        }
        igemm::stats_merge(&st_cnt, &st_mean, &st_m2, rows, mean, m2);
      }
    }
    if (kPasses > 1) __syncthreads();  // the tile is rewritten by the next pass
  }
  if (stat_col) {
    const int64_t n = n_glob0 + stat_n;
    a.ws[(static_cast<int64_t>(blockIdx.x) * 2 + 0) * g.k + n] = st_mean;
    a.ws[(static_cast<int64_t>(blockIdx.x) * 2 + 1) * g.k + n] = st_m2;
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

ConvShape shape_of(const IgemmConv& c) {
  ConvShape g;
  g.n = c.n;
  g.h = c.h;
  g.w = c.w_in;
  g.c = c.c;
  g.k = c.k;
  g.r = static_cast<int>(c.r);
  g.s = static_cast<int>(c.s);
  g.p = c.p;
  g.q = c.q;
  g.sh = static_cast<int>(c.stride_h);
  g.sw = static_cast<int>(c.stride_w);
  g.ph = static_cast<int>(c.pad_h);
  g.pw = static_cast<int>(c.pad_w);
  g.dh = static_cast<int>(c.dil_h);
  g.dw = static_cast<int>(c.dil_w);
  g.groups = c.groups;
  g.cg = c.groups > 0 ? c.c / c.groups : 0;
  g.kg = c.groups > 0 ? c.k / c.groups : 0;
  return g;
}

// The tile is chosen by the output channels of ONE group (Kg): BN = 64 when Kg <= 64. For
// ResNeXt (Kg = 8..64) most of the 64-wide tile is then zero-filled weight rows: see
// csrc/README.md ("Groups") for what that costs and what a better kernel would do.
template <typename T>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  const int64_t m_tiles = (a.g.rows() + kBM - 1) / kBM;
  if (a.g.kg <= 64) {
    const dim3 grid(static_cast<unsigned>(m_tiles),
                    static_cast<unsigned>(a.g.groups * igemm::n_tiles_per_group(a.g, 64)));
    igemm_kernel<T, 64><<<grid, Tile<64>::kWarpsM * Tile<64>::kWarpsN * 32, 0, stream>>>(a);
  } else {
    const dim3 grid(static_cast<unsigned>(m_tiles),
                    static_cast<unsigned>(a.g.groups * igemm::n_tiles_per_group(a.g, 128)));
    igemm_kernel<T, 128><<<grid, Tile<128>::kWarpsM * Tile<128>::kWarpsN * 32, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t run(DType dtype, const Args& a, cudaStream_t stream) {
  if (dtype == DType::Float16) return launch<__half>(a, stream);
  if (dtype == DType::BFloat16) return launch<__nv_bfloat16>(a, stream);
  if (dtype == DType::Float32) return launch<float>(a, stream);  // TF32 math
  return cudaErrorInvalidValue;
}

constexpr int64_t kInt32Max = 2147483647;

int elem_bytes(DType dtype) {
  switch (dtype) {
    case DType::Float16:
    case DType::BFloat16:
      return 2;
    case DType::Float32:
      return 4;
    default:
      return 0;
  }
}

}  // namespace

bool igemm_supported(DType dtype, const IgemmConv& c) {
  const int eb = elem_bytes(dtype);
  if (eb == 0) return false;
  const int64_t vec = igemm::vec_elems(eb);
  if (c.groups <= 0 || c.c <= 0 || c.k <= 0 || c.c % c.groups != 0 || c.k % c.groups != 0)
    return false;
  const int64_t cg = c.c / c.groups, kg = c.k / c.groups;
  if (cg % vec != 0 || kg % vec != 0) return false;   // 16-byte vectors inside one group
  if (c.r * c.s * cg > kInt32Max - kBK) return false;  // reduction index is int32
  // Spatial indices are int32 (ih = p*stride - pad + r*dil); offsets are int64.
  const int64_t lim = kInt32Max / 4;
  for (int64_t v : {c.h, c.w_in, c.p, c.q, c.r, c.s, c.stride_h, c.stride_w, c.pad_h, c.pad_w,
                    c.dil_h, c.dil_w})
    if (v < 0 || v > lim) return false;
  if (c.p * c.stride_h + c.r * c.dil_h > lim || c.q * c.stride_w + c.s * c.dil_w > lim) return false;
  if ((c.n * c.p * c.q + kBM - 1) / kBM > kInt32Max) return false;  // gridDim.x
  if (c.groups * ((kg + 63) / 64) > 65535) return false;             // gridDim.y
  return aligned16(c.x) && aligned16(c.w);
}

int64_t igemm_stats_chunks(int64_t rows) { return rows <= 0 ? 0 : (rows + kBM - 1) / kBM; }

cudaError_t igemm_conv_bn_act(DType dtype, const IgemmConv& conv, const float* scale,
                              const float* shift, const void* residual, bool relu, void* y,
                              cudaStream_t stream) {
  if (!igemm_supported(dtype, conv) || scale == nullptr || shift == nullptr || !aligned16(y) ||
      !aligned16(residual))
    return cudaErrorInvalidValue;
  Args a{shape_of(conv), conv.x, conv.w, y, scale, shift, residual, nullptr,
         relu, /*prologue=*/false, nullptr, nullptr, false};
  if (a.g.rows() == 0) return cudaSuccess;
  return run(dtype, a, stream);
}

cudaError_t igemm_conv_stats(DType dtype, const IgemmConv& conv, const float* in_scale,
                             const float* in_shift, bool in_relu, void* z, void* workspace,
                             float* stats, cudaStream_t stream) {
  if (!igemm_supported(dtype, conv) || !aligned16(z) || workspace == nullptr)
    return cudaErrorInvalidValue;
  const bool prologue = in_scale != nullptr || in_shift != nullptr || in_relu;
  Args a{shape_of(conv), conv.x, conv.w, z, nullptr, nullptr, nullptr,
         static_cast<double*>(workspace), false, prologue, in_scale, in_shift, in_relu};
  const int64_t rows = a.g.rows();
  if (rows > 0) {
    const cudaError_t err = run(dtype, a, stream);
    if (err != cudaSuccess) return err;
  }
  // rows == 0: no partials; the merge writes mean NaN and M2 0 (as channel_stats).
  return channel_stats_merge(DType::Float32, workspace, igemm_stats_chunks(rows), rows, kBM,
                             conv.k, stats, stream);
}

}  // namespace cuda
}  // namespace fused_resnet
