// Tensor-core implicit-GEMM convolution over NHWC for float16 / bfloat16 (float32
// accumulation), with conv_bn_act's epilogue and conv_stats' statistics epilogue fused.
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
// Two tile configurations, chosen by K: BN = 128 (8 warps, 3 stages) and BN = 64 for K <= 64
// (4 warps, 4 stages). Static shared memory <= 48 KiB, so no opt-in attribute is needed.
// Epilogue variants are runtime flags (few instantiations: 2 dtypes x 2 tiles).
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
  const uint16_t* x;
  const uint16_t* w;
  uint16_t* y;
  const float* scale;     // null: no affine (conv_stats)
  const float* shift;
  const uint16_t* residual;
  double* ws;             // non-null: write statistics partials
  bool relu;
  // conv_stats' prologue: x -> relu?(x * in_scale[c] + in_shift[c]) rounded to the dtype,
  // applied to the A tile in shared memory; padding stays 0 (after the transform).
  bool prologue;
  const float* in_scale;  // null: 1
  const float* in_shift;  // null: 0
  bool in_relu;
};

// ---- dtype plumbing on raw 16-bit storage (shared memory holds uint16_t) ----------------
template <typename T>
struct Bits;
template <>
struct Bits<__half> {
  static __device__ __forceinline__ float to_float(uint16_t b) {
    return __half2float(__ushort_as_half(b));
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
template <>
struct Bits<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(uint16_t b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
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

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
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
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

using igemm::Tile;

template <typename T, int BN>
__global__ void __launch_bounds__(Tile<BN>::kWarpsM* Tile<BN>::kWarpsN * 32, 1)
    igemm_kernel(const Args a) {
  constexpr int kWarpsM = Tile<BN>::kWarpsM, kWarpsN = Tile<BN>::kWarpsN;
  constexpr int kStages = Tile<BN>::kStages;
  constexpr int kThreads = kWarpsM * kWarpsN * 32;
  constexpr int kWM = kBM / kWarpsM, kWN = BN / kWarpsN;  // 64 x 32 per warp
  constexpr int kMT = kWM / 16, kNT = kWN / 8;            // mma tiles per warp
  constexpr int kATile = kBM * kBK, kBTile = BN * kBK;    // elements per stage
  constexpr int kAIters = kBM * igemm::kChunks / kThreads;
  constexpr int kBIters = BN * igemm::kChunks / kThreads;
  constexpr int kCStride = BN + 8;  // epilogue tile row stride (elements): conflict-free
  constexpr int kPipe = kStages * (kATile + kBTile);
  constexpr int kEpi = kBM * kCStride;
  constexpr int kSmem = kPipe > kEpi ? kPipe : kEpi;
  static_assert(kSmem * 2 <= 48 * 1024, "static shared memory limit");
  static_assert(kAIters * kThreads == kBM * igemm::kChunks, "A loader covers the tile");
  static_assert(kBIters * kThreads == BN * igemm::kChunks, "B loader covers the tile");
  static_assert(kNT % 2 == 0, "B fragments come in pairs of n8 tiles");
  __shared__ __align__(128) uint16_t smem[kSmem];

  const ConvShape& g = a.g;
  const int tid = threadIdx.x;
  const int64_t m_block = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n_block = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t M = g.rows();
  const int KR = static_cast<int>(g.red());

  // Loader state: this thread's rows of A (output pixels) and of B^T (output channels).
  const int lchunk = igemm::loader_chunk(tid);
  igemm::RowInfo arow[kAIters];
#pragma unroll
  for (int i = 0; i < kAIters; ++i)
    arow[i] = igemm::a_row(g, m_block + igemm::loader_row(tid, i, kThreads));

  auto load_stage = [&](int stage, int kt) {
    uint16_t* as = smem + stage * (kATile + kBTile);
    uint16_t* bs = as + kATile;
    const int k = kt * kBK + lchunk * kVec;
    const igemm::KInfo ki = igemm::k_decompose(g, k);
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      int64_t off = 0;
      const bool ok = igemm::a_offset(g, arow[i], ki, &off);
      const int row = igemm::loader_row(tid, i, kThreads);
      cp_async16(smem_u32(as + igemm::swizzle(row, lchunk)), a.x + off, ok);
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int row = igemm::loader_row(tid, i, kThreads);
      int64_t off = 0;
      const bool ok = igemm::b_offset(g, n_block + row, k, &off);
      cp_async16(smem_u32(bs + igemm::swizzle(row, lchunk)), a.w + off, ok);
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

  const int k_tiles = (KR + kBK - 1) / kBK;
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
      // are skipped, so padding is 0 after the transform, as the contract says.
      uint16_t* aw = smem + (kt % kStages) * (kATile + kBTile);
      const int k = kt * kBK + lchunk * kVec;
      const igemm::KInfo ki = igemm::k_decompose(g, k);
      if (ki.valid) {
        float sc[kVec], sf[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          sc[e] = a.in_scale != nullptr ? __ldg(a.in_scale + ki.c + e) : 1.f;
          sf[e] = a.in_shift != nullptr ? __ldg(a.in_shift + ki.c + e) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < kAIters; ++i) {
          int64_t off = 0;
          if (!igemm::a_offset(g, arow[i], ki, &off)) continue;
          uint4* vp = reinterpret_cast<uint4*>(
              aw + igemm::swizzle(igemm::loader_row(tid, i, kThreads), lchunk));
          uint4 v = *vp;
          uint32_t* w32 = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
          for (int e2 = 0; e2 < kVec / 2; ++e2) {
            float lo = __fmaf_rn(Bits<T>::to_float(static_cast<uint16_t>(w32[e2] & 0xffffu)),
                                 sc[2 * e2], sf[2 * e2]);
            float hi = __fmaf_rn(Bits<T>::to_float(static_cast<uint16_t>(w32[e2] >> 16)),
                                 sc[2 * e2 + 1], sf[2 * e2 + 1]);
            if (a.in_relu) {
              lo = lo < 0.f ? 0.f : lo;
              hi = hi < 0.f ? 0.f : hi;
            }
            w32[e2] = static_cast<uint32_t>(Bits<T>::from_float(lo)) |
                      (static_cast<uint32_t>(Bits<T>::from_float(hi)) << 16);
          }
          *vp = v;
        }
      }
      __syncthreads();  // the whole tile is transformed before any warp reads it
    }

    const uint16_t* as = smem + (kt % kStages) * (kATile + kBTile);
    const uint16_t* bs = as + kATile;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
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
        for (int j = 0; j < kNT; ++j) mma16816<T>(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // pipeline buffers become the epilogue tile

  // ---- epilogue 1: fragments -> (affine, residual, ReLU) -> rounded -> smem tile ----------
  uint16_t* cs = smem;
  const bool affine = a.scale != nullptr;
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int col = wn0 + j * 8 + igemm::acc_col(lane, 0);  // even; col + 1 is its pair
    const int64_t n = n_block + col;
    const bool n_ok = n < g.k;  // K % 8 == 0: n + 1 < K too
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
        const int row = wm0 + i * 16 + igemm::acc_row(lane, 2 * h);
        float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if (affine) {
          v0 = __fmaf_rn(v0, sc0, sh0);
          v1 = __fmaf_rn(v1, sc1, sh1);
        }
        const int64_t m = m_block + row;
        if (a.residual != nullptr && n_ok && m < M) {
          const uint32_t rr = *reinterpret_cast<const uint32_t*>(a.residual + m * g.k + n);
          v0 += Bits<T>::to_float(static_cast<uint16_t>(rr & 0xffffu));
          v1 += Bits<T>::to_float(static_cast<uint16_t>(rr >> 16));
        }
        if (a.relu) {
          v0 = v0 < 0.f ? 0.f : v0;  // NaN propagates, as torch.relu
          v1 = v1 < 0.f ? 0.f : v1;
        }
        const uint32_t packed = static_cast<uint32_t>(Bits<T>::from_float(v0)) |
                                (static_cast<uint32_t>(Bits<T>::from_float(v1)) << 16);
        *reinterpret_cast<uint32_t*>(cs + row * kCStride + col) = packed;
      }
    }
  }
  __syncthreads();

  // ---- epilogue 2: smem tile -> global, 16-byte vectors ------------------------------------
  constexpr int kVecsPerRow = BN / kVec;
#pragma unroll 4
  for (int idx = tid; idx < kBM * kVecsPerRow; idx += kThreads) {
    const int row = igemm::out_row(idx, BN);
    const int col = igemm::out_col(idx, BN);
    const int64_t m = m_block + row;
    const int64_t n = n_block + col;
    if (m < M && n < g.k)
      *reinterpret_cast<uint4*>(a.y + m * g.k + n) =
          *reinterpret_cast<const uint4*>(cs + row * kCStride + col);
  }

  // ---- epilogue 3 (conv_stats): per-channel two-pass (mean, M2) of this chunk's rows ------
  if (a.ws != nullptr) {
    const int rows = static_cast<int>(M - m_block < kBM ? M - m_block : kBM);
    for (int col = tid; col < BN; col += kThreads) {
      const int64_t n = n_block + col;
      if (n >= g.k) continue;
      double sum = 0.0;
      for (int r = 0; r < rows; ++r) sum += Bits<T>::to_float(cs[r * kCStride + col]);
      const double mean = sum / rows;
      double m2 = 0.0;
      for (int r = 0; r < rows; ++r) {
        const double d = Bits<T>::to_float(cs[r * kCStride + col]) - mean;
        m2 += d * d;
      }
      a.ws[(static_cast<int64_t>(blockIdx.x) * 2 + 0) * g.k + n] = mean;
      a.ws[(static_cast<int64_t>(blockIdx.x) * 2 + 1) * g.k + n] = m2;
    }
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
  return g;
}

template <typename T>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  const int64_t m_tiles = (a.g.rows() + kBM - 1) / kBM;
  if (a.g.k <= 64) {
    const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>((a.g.k + 63) / 64));
    igemm_kernel<T, 64><<<grid, Tile<64>::kWarpsM * Tile<64>::kWarpsN * 32, 0, stream>>>(a);
  } else {
    const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>((a.g.k + 127) / 128));
    igemm_kernel<T, 128><<<grid, Tile<128>::kWarpsM * Tile<128>::kWarpsN * 32, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t run(DType dtype, const Args& a, cudaStream_t stream) {
  if (dtype == DType::Float16) return launch<__half>(a, stream);
  if (dtype == DType::BFloat16) return launch<__nv_bfloat16>(a, stream);
  return cudaErrorInvalidValue;
}

constexpr int64_t kInt32Max = 2147483647;

}  // namespace

bool igemm_supported(DType dtype, const IgemmConv& c) {
  if (dtype != DType::Float16 && dtype != DType::BFloat16) return false;
  if (c.c % kVec != 0 || c.k % kVec != 0 || c.c <= 0 || c.k <= 0) return false;
  if (c.r * c.s * c.c > kInt32Max - kBK) return false;  // reduction index is int32
  // Spatial indices are int32 (ih = p*stride - pad + r*dil); offsets are int64.
  const int64_t lim = kInt32Max / 4;
  for (int64_t v : {c.h, c.w_in, c.p, c.q, c.r, c.s, c.stride_h, c.stride_w, c.pad_h, c.pad_w,
                    c.dil_h, c.dil_w})
    if (v < 0 || v > lim) return false;
  if (c.p * c.stride_h + c.r * c.dil_h > lim || c.q * c.stride_w + c.s * c.dil_w > lim) return false;
  if ((c.n * c.p * c.q + kBM - 1) / kBM > kInt32Max) return false;  // gridDim.x
  if ((c.k + 63) / 64 > 65535) return false;                         // gridDim.y
  return aligned16(c.x) && aligned16(c.w);
}

int64_t igemm_stats_chunks(int64_t rows) { return rows <= 0 ? 0 : (rows + kBM - 1) / kBM; }

cudaError_t igemm_conv_bn_act(DType dtype, const IgemmConv& conv, const float* scale,
                              const float* shift, const void* residual, bool relu, void* y,
                              cudaStream_t stream) {
  if (!igemm_supported(dtype, conv) || scale == nullptr || shift == nullptr || !aligned16(y) ||
      !aligned16(residual))
    return cudaErrorInvalidValue;
  Args a{shape_of(conv), static_cast<const uint16_t*>(conv.x), static_cast<const uint16_t*>(conv.w),
         static_cast<uint16_t*>(y), scale, shift, static_cast<const uint16_t*>(residual), nullptr,
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
  Args a{shape_of(conv), static_cast<const uint16_t*>(conv.x), static_cast<const uint16_t*>(conv.w),
         static_cast<uint16_t*>(z), nullptr, nullptr, nullptr, static_cast<double*>(workspace),
         false, prologue, in_scale, in_shift, in_relu};
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
