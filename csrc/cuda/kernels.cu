// fused_resnet CUDA kernels: the elementwise family (conv epilogue, conv prologue,
// bn_add_act, stats_backward), deterministic per-channel reductions (conv_stats'
// statistics, bn_add_act's backward) and the tiny per-channel BatchNorm kernels.
//
// Only CUDA headers here (see kernels.cuh for why). Conventions:
//  * An activation is a row-major [rows, channels] matrix (NHWC). Threads are laid out as
//    a 2-D block (TX channel-vectors x TY rows, TX*TY = 256): each thread owns V
//    consecutive channels for the whole kernel, so per-channel parameters are loaded once
//    into registers and no per-element `index % channels` is needed; a warp reads whole
//    row segments, so accesses coalesce even for 3 or 5 channels.
//  * V = 16 bytes / sizeof(T) when channels % V == 0 and every activation pointer is
//    16-byte aligned (one 128-bit access per thread and row), else V = 1.
//  * All index arithmetic is int64; loops are grid-stride; grid sizes are capped.
//  * Reductions are deterministic: each block reduces a fixed [row-chunk x channel-tile]
//    in a fixed order, writes per-chunk partials to a workspace, and a second kernel merges
//    the chunks of each channel in a fixed order in double. No atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"

namespace fused_resnet {
namespace cuda {
namespace {

constexpr int kThreads = 256;             // threads per block of every activation kernel
constexpr int kMaxGridY = 65535;          // hardware limit of gridDim.y (and z)
constexpr int64_t kMaxGridX = 2147483647;  // hardware limit of gridDim.x
// Elementwise: enough blocks to fill any current GPU several times over; more only adds
// scheduling overhead since every thread loops over rows.
constexpr int64_t kElementwiseBlocks = 4096;
// Reductions: about this many blocks in total (shape-only, so results are reproducible
// across GPUs), each chunk at least kMinRowsPerChunk rows so the merge stays cheap, and at
// most 2^24 rows so per-chunk counts are exact in float.
constexpr int64_t kReduceBlocks = 1024;
constexpr int64_t kMinRowsPerChunk = 128;
constexpr int64_t kMaxRowsPerChunk = int64_t{1} << 24;
constexpr int64_t kNominalTileChannels = 256;
// Merge kernels: 8 channels x 32 chunk-lanes per block.
constexpr int kMergeChannels = 8;
constexpr int kMergeLanes = 32;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
template <typename I>
__host__ __device__ __forceinline__ I min_(I a, I b) {
  return a < b ? a : b;
}
template <typename I>
__host__ __device__ __forceinline__ I max_(I a, I b) {
  return a > b ? a : b;
}

// ---------------------------------------------------------------------------------------
// dtype plumbing

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Running statistics may be of any floating dtype; they are updated in double.
__device__ __forceinline__ double to_double(float v) { return v; }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(__half v) { return __half2float(v); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename R>
__device__ __forceinline__ R from_double(double v);
template <>
__device__ __forceinline__ float from_double<float>(double v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ double from_double<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_double<__half>(double v) { return __double2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double v) {
  return __double2bfloat16(v);
}

// Explicit fused multiply-add: the forward (affine_act) and the backward recompute of the
// pre-activation must round identically, or ReLU masks could disagree at pre == 0. Spelling
// the FMA out removes any dependence on the compiler's contraction choices.
__device__ __forceinline__ float fma_(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename A>
__device__ __forceinline__ A quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// V consecutive elements moved as one access (128-bit when V * sizeof(T) == 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Loaded rows stay packed in registers until used: half the registers of converting
// fp16/bf16 to float at load time, which matters with several rows in flight per thread.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const typename AccOf<T>::type (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = from_acc<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

template <typename A>
__device__ __forceinline__ A param_or(const A* p, int64_t c, A fallback) {
  return p != nullptr ? __ldg(p + c) : fallback;
}

// Shared by the forward and the backward so both see the same pre-activation bits.
template <typename A>
__device__ __forceinline__ A pre_activation(A z, A a, A b, bool has_res, A r, A rs, A rsh) {
  A v = fma_(z, a, b);
  if (has_res) v += fma_(r, rs, rsh);
  return v;
}

// torch.relu keeps NaN (v < 0 is false for NaN).
template <typename A>
__device__ __forceinline__ A relu_(A v) {
  return v < A(0) ? A(0) : v;
}

// ---------------------------------------------------------------------------------------
// Elementwise family

template <typename A>
struct AffineArgs {
  const A* center;
  const A* scale;
  const A* shift;
  const A* res_scale;
  const A* res_shift;
  A scale_mul;
  A shift_mul;
};

// y = act((z - center) * scale * scale_mul + shift * shift_mul (+ residual * rs + rsh)).
// z and y may alias (in-place epilogue): each element is read and then written by the same
// thread, hence no __restrict__ on them.
template <typename T, int V, int U>
__global__ void __launch_bounds__(kThreads)
    affine_act_kernel(const T* z, const T* residual, T* y, int64_t rows, int64_t channels,
                      int64_t tiles, AffineArgs<typename AccOf<T>::type> p, bool relu) {
  using A = typename AccOf<T>::type;
  const int64_t tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const bool has_res = residual != nullptr;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t c0 = (tile * TX + tx) * V;
    if (c0 >= channels) continue;  // no barriers in this kernel
    A ctr[V], a[V], b[V], rs[V], rsh[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int64_t c = c0 + i;
      ctr[i] = param_or(p.center, c, A(0));
      a[i] = p.scale != nullptr ? __ldg(p.scale + c) * p.scale_mul : A(1);
      b[i] = p.shift != nullptr ? __ldg(p.shift + c) * p.shift_mul : A(0);
      rs[i] = param_or(p.res_scale, c, A(1));
      rsh[i] = param_or(p.res_shift, c, A(0));
    }
    const int64_t step = static_cast<int64_t>(gridDim.x) * TY * U;
    for (int64_t base = static_cast<int64_t>(blockIdx.x) * TY * U + ty; base < rows;
         base += step) {
      // All U rows are loaded before any is stored: memory-level parallelism, and it
      // keeps the in-place case trivially safe.
      Pack<T, V> zv[U], rv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t r = base + u * TY;
        if (r < rows) {
          zv[u] = load_pack<T, V>(z + r * channels + c0);
          if (has_res) rv[u] = load_pack<T, V>(residual + r * channels + c0);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t r = base + u * TY;
        if (r < rows) {
          A out[V];
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const A v = pre_activation(to_acc(zv[u].v[i]) - ctr[i], a[i], b[i], has_res,
                                       has_res ? to_acc(rv[u].v[i]) : A(0), rs[i], rsh[i]);
            out[i] = relu ? relu_(v) : v;
          }
          store_pack<T, V>(y + r * channels + c0, out);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Per-channel statistics: Welford per thread, Chan within the block, per-chunk partials.

// Chan et al.'s pairwise combination, in double, of (n, mean, m2) with (nb, mb, m2b).
__device__ __forceinline__ void chan_merge(double& n, double& mean, double& m2, double nb,
                                           double mb, double m2b) {
  if (nb == 0.0) return;
  const double nab = n + nb;
  const double delta = mb - mean;
  const double f = nb / nab;
  m2 += m2b + delta * delta * n * f;
  mean += delta * f;
  n = nab;
}

// Grid: x = row chunk, y = channel tile (grid-stride). Writes, in double,
// ws[chunk][0][c] = mean and ws[chunk][1][c] = M2 of rows [chunk * rows_per_chunk, ...).
//
// Accuracy when |mean| >> std: every value is first shifted by the chunk's first value of
// its channel (exact in floating point when both are within a factor 2, Sterbenz), so the
// float Welford/Chan arithmetic only ever sees deviations of order std, and the shift is
// added back in double. Without it, float32 Welford on data with |mean|/std = 3e4 loses
// ~1e-4 of M2; with it the error stays at the level of a well-conditioned sum.
template <typename T, int V, int U>
__global__ void __launch_bounds__(kThreads)
    channel_stats_partial_kernel(const T* __restrict__ z, int64_t rows, int64_t channels,
                                 int64_t rows_per_chunk, int64_t tiles, double* __restrict__ ws) {
  using A = typename AccOf<T>::type;
  __shared__ A sh_mean[V * kThreads];
  __shared__ A sh_m2[V * kThreads];
  __shared__ int sh_n[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int tid = ty * TX + tx;
  const int64_t chunk = blockIdx.x;
  const int64_t row0 = chunk * rows_per_chunk;
  const int64_t row1 = min_(rows, row0 + rows_per_chunk);
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t c0 = (tile * TX + tx) * V;
    const bool active = c0 < channels;
    int n = 0;  // rows this thread has seen; the same for all its V channels
    A shift[V], mean[V], m2[V];
#pragma unroll
    for (int i = 0; i < V; ++i) shift[i] = mean[i] = m2[i] = A(0);
    if (active) {
      const Pack<T, V> first = load_pack<T, V>(z + row0 * channels + c0);
#pragma unroll
      for (int i = 0; i < V; ++i) shift[i] = to_acc(first.v[i]);
      for (int64_t base = row0 + ty; base < row1; base += static_cast<int64_t>(TY) * U) {
        Pack<T, V> xv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t r = base + static_cast<int64_t>(u) * TY;
          if (r < row1) xv[u] = load_pack<T, V>(z + r * channels + c0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t r = base + static_cast<int64_t>(u) * TY;
          if (r < row1) {
            ++n;
            const A inv = A(1) / static_cast<A>(n);
#pragma unroll
            for (int i = 0; i < V; ++i) {
              const A x = to_acc(xv[u].v[i]) - shift[i];
              const A d = x - mean[i];
              mean[i] += d * inv;
              m2[i] += d * (x - mean[i]);
            }
          }
        }
      }
    }
    __syncthreads();  // the previous tile's tree has finished reading shared memory
    sh_n[tid] = n;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      sh_mean[i * kThreads + tid] = mean[i];
      sh_m2[i * kThreads + tid] = m2[i];
    }
    __syncthreads();
    // Fixed tree over the TY thread-rows (TY is a power of two); all means share the shift.
    for (int s = TY / 2; s > 0; s >>= 1) {
      if (ty < s) {
        const int o = tid + s * TX;
        const int na = sh_n[tid], nb = sh_n[o];
        if (nb > 0) {
          const int nab = na + nb;
          const A f = static_cast<A>(nb) / static_cast<A>(nab);
          const A fa = static_cast<A>(na) * f;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const A ma = sh_mean[i * kThreads + tid], mb = sh_mean[i * kThreads + o];
            const A delta = mb - ma;
            sh_m2[i * kThreads + tid] += sh_m2[i * kThreads + o] + delta * delta * fa;
            sh_mean[i * kThreads + tid] = ma + delta * f;
          }
          sh_n[tid] = nab;
        }
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        ws[(chunk * 2 + 0) * channels + c0 + i] =
            static_cast<double>(shift[i]) + static_cast<double>(sh_mean[i * kThreads + tid]);
        ws[(chunk * 2 + 1) * channels + c0 + i] = static_cast<double>(sh_m2[i * kThreads + tid]);
      }
    }
  }
}

// Block: kMergeChannels channels x kMergeLanes lanes; lane l merges chunks l, l + 32, ...
// in order, then a fixed tree merges the lanes. stats[0][c] = mean (NaN when rows == 0),
// stats[1][c] = M2.
template <typename A>
__global__ void __launch_bounds__(kMergeChannels* kMergeLanes)
    channel_stats_merge_kernel(const double* __restrict__ ws, int64_t chunks, int64_t rows,
                               int64_t rows_per_chunk, int64_t channels, A* __restrict__ stats) {
  __shared__ double sh_n[kMergeChannels * kMergeLanes];
  __shared__ double sh_mean[kMergeChannels * kMergeLanes];
  __shared__ double sh_m2[kMergeChannels * kMergeLanes];
  const int tx = threadIdx.x, lane = threadIdx.y;
  const int tid = lane * kMergeChannels + tx;
  for (int64_t group = blockIdx.x; group * kMergeChannels < channels; group += gridDim.x) {
    const int64_t c = group * kMergeChannels + tx;
    double n = 0.0, mean = 0.0, m2 = 0.0;
    if (c < channels) {
      for (int64_t k = lane; k < chunks; k += kMergeLanes) {
        const double nb = static_cast<double>(min_(rows_per_chunk, rows - k * rows_per_chunk));
        chan_merge(n, mean, m2, nb, ws[(k * 2 + 0) * channels + c], ws[(k * 2 + 1) * channels + c]);
      }
    }
    __syncthreads();
    sh_n[tid] = n;
    sh_mean[tid] = mean;
    sh_m2[tid] = m2;
    __syncthreads();
    for (int s = kMergeLanes / 2; s > 0; s >>= 1) {
      if (lane < s) {
        const int o = tid + s * kMergeChannels;
        double na = sh_n[tid], ma = sh_mean[tid], m2a = sh_m2[tid];
        chan_merge(na, ma, m2a, sh_n[o], sh_mean[o], sh_m2[o]);
        sh_n[tid] = na;
        sh_mean[tid] = ma;
        sh_m2[tid] = m2a;
      }
      __syncthreads();
    }
    if (lane == 0 && c < channels) {
      stats[c] = sh_n[tid] > 0.0 ? static_cast<A>(sh_mean[tid]) : quiet_nan<A>();
      stats[channels + c] = static_cast<A>(sh_m2[tid]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// bn_add_act backward: elementwise outputs + per-chunk partial sums.

template <typename A>
struct BackwardArgs {
  const A* scale;
  const A* shift;
  const A* res_scale;
  const A* res_shift;
};

constexpr int kBwdSums = 3;  // sum(g * z), sum(g), sum(g * residual)

// Grid: x = row chunk, y = channel tile (grid-stride). ws[chunk][j][c] holds sum j.
template <typename T, int V, int U>
__global__ void __launch_bounds__(kThreads) bn_add_act_backward_partial_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ z, const T* __restrict__ residual,
    BackwardArgs<typename AccOf<T>::type> p, bool relu, int64_t rows, int64_t channels,
    int64_t rows_per_chunk, int64_t tiles, T* __restrict__ grad_z, T* __restrict__ grad_residual,
    typename AccOf<T>::type* __restrict__ ws) {
  using A = typename AccOf<T>::type;
  __shared__ A sh[kBwdSums * V * kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int tid = ty * TX + tx;
  const int64_t chunk = blockIdx.x;
  const int64_t row0 = chunk * rows_per_chunk;
  const int64_t row1 = min_(rows, row0 + rows_per_chunk);
  const bool has_res = residual != nullptr;
  const bool has_rs = has_res && p.res_scale != nullptr;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t c0 = (tile * TX + tx) * V;
    const bool active = c0 < channels;
    A s_gz[V], s_g[V], s_gr[V];
#pragma unroll
    for (int i = 0; i < V; ++i) s_gz[i] = s_g[i] = s_gr[i] = A(0);
    if (active) {
      A a[V], b[V], rs[V], rsh[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t c = c0 + i;
        a[i] = __ldg(p.scale + c);
        b[i] = __ldg(p.shift + c);
        rs[i] = param_or(p.res_scale, c, A(1));
        rsh[i] = param_or(p.res_shift, c, A(0));
      }
      for (int64_t base = row0 + ty; base < row1; base += static_cast<int64_t>(TY) * U) {
        Pack<T, V> gv[U], zv[U], rv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t r = base + static_cast<int64_t>(u) * TY;
          if (r < row1) {
            gv[u] = load_pack<T, V>(grad_out + r * channels + c0);
            zv[u] = load_pack<T, V>(z + r * channels + c0);
            if (has_res) rv[u] = load_pack<T, V>(residual + r * channels + c0);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t r = base + static_cast<int64_t>(u) * TY;
          if (r < row1) {
            A gz[V], gr[V];
#pragma unroll
            for (int i = 0; i < V; ++i) {
              const A zvi = to_acc(zv[u].v[i]);
              const A rvi = has_res ? to_acc(rv[u].v[i]) : A(0);
              A g = to_acc(gv[u].v[i]);
              if (relu) {
                const A pre = pre_activation(zvi, a[i], b[i], has_res, rvi, rs[i], rsh[i]);
                g = pre > A(0) ? g : A(0);
              }
              gz[i] = g * a[i];
              gr[i] = g * rs[i];
              s_gz[i] += g * zvi;
              s_g[i] += g;
              if (has_rs) s_gr[i] += g * rvi;
            }
            store_pack<T, V>(grad_z + r * channels + c0, gz);
            if (has_res) store_pack<T, V>(grad_residual + r * channels + c0, gr);
          }
        }
      }
    }
    __syncthreads();  // the previous tile's tree has finished reading shared memory
#pragma unroll
    for (int i = 0; i < V; ++i) {
      sh[(0 * V + i) * kThreads + tid] = s_gz[i];
      sh[(1 * V + i) * kThreads + tid] = s_g[i];
      sh[(2 * V + i) * kThreads + tid] = s_gr[i];
    }
    __syncthreads();
    for (int s = TY / 2; s > 0; s >>= 1) {
      if (ty < s) {
        const int o = tid + s * TX;
#pragma unroll
        for (int j = 0; j < kBwdSums * V; ++j) sh[j * kThreads + tid] += sh[j * kThreads + o];
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int j = 0; j < kBwdSums; ++j) {
#pragma unroll
        for (int i = 0; i < V; ++i)
          ws[(chunk * kBwdSums + j) * channels + c0 + i] = sh[(j * V + i) * kThreads + tid];
      }
    }
  }
}

template <typename A>
struct SumOutputs {
  A* out[kBwdSums];  // null: that sum is not wanted
};

// out[j][c] = sum over chunks of ws[chunk][j][c]: lanes take chunks l, l + 32, ... in order
// (double), then a fixed tree over lanes. chunks == 0 gives zeros.
template <typename A>
__global__ void __launch_bounds__(kMergeChannels* kMergeLanes)
    channel_sums_merge_kernel(const A* __restrict__ ws, int64_t chunks, int64_t channels,
                              SumOutputs<A> outs) {
  __shared__ double sh[kBwdSums * kMergeChannels * kMergeLanes];
  constexpr int kB = kMergeChannels * kMergeLanes;
  const int tx = threadIdx.x, lane = threadIdx.y;
  const int tid = lane * kMergeChannels + tx;
  for (int64_t group = blockIdx.x; group * kMergeChannels < channels; group += gridDim.x) {
    const int64_t c = group * kMergeChannels + tx;
    double s[kBwdSums] = {0.0, 0.0, 0.0};
    if (c < channels) {
      for (int64_t k = lane; k < chunks; k += kMergeLanes) {
#pragma unroll
        for (int j = 0; j < kBwdSums; ++j)
          if (outs.out[j] != nullptr)
            s[j] += static_cast<double>(ws[(k * kBwdSums + j) * channels + c]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kBwdSums; ++j) sh[j * kB + tid] = s[j];
    __syncthreads();
    for (int st = kMergeLanes / 2; st > 0; st >>= 1) {
      if (lane < st) {
#pragma unroll
        for (int j = 0; j < kBwdSums; ++j)
          sh[j * kB + tid] += sh[j * kB + tid + st * kMergeChannels];
      }
      __syncthreads();
    }
    if (lane == 0 && c < channels) {
#pragma unroll
      for (int j = 0; j < kBwdSums; ++j)
        if (outs.out[j] != nullptr) outs.out[j][c] = static_cast<A>(sh[j * kB + tid]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Per-channel BatchNorm kernels (K threads' worth of work; computed in double).

template <typename A>
__global__ void bn_finalize_kernel(const A* __restrict__ stats, int64_t channels, double count,
                                   const A* __restrict__ gamma, const A* __restrict__ beta,
                                   double eps, A* __restrict__ scale, A* __restrict__ shift,
                                   A* __restrict__ save_mean, A* __restrict__ save_invstd) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double mean = static_cast<double>(stats[c]);
    const double m2 = static_cast<double>(stats[channels + c]);
    const double invstd = 1.0 / sqrt(m2 / count + eps);
    const double g = gamma != nullptr ? static_cast<double>(gamma[c]) : 1.0;
    const double bt = beta != nullptr ? static_cast<double>(beta[c]) : 0.0;
    const A sc = static_cast<A>(g * invstd);
    // shift from the rounded scale (as the reference does), so z*scale + shift maps the
    // mean to beta as closely as the rounded scale allows even when |mean| >> std.
    scale[c] = sc;
    shift[c] = static_cast<A>(bt - mean * static_cast<double>(sc));
    save_mean[c] = static_cast<A>(mean);
    save_invstd[c] = static_cast<A>(invstd);
  }
}

template <typename A>
__global__ void bn_finalize_backward_kernel(const A* __restrict__ grad_scale,
                                            const A* __restrict__ grad_shift,
                                            const A* __restrict__ grad_mean,
                                            const A* __restrict__ grad_invstd,
                                            const A* __restrict__ gamma, const A* __restrict__ scale,
                                            const A* __restrict__ mean, const A* __restrict__ invstd,
                                            int64_t channels, double half_over_n,
                                            A* __restrict__ grad_stats, A* __restrict__ grad_gamma) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double g_s = grad_scale != nullptr ? static_cast<double>(grad_scale[c]) : 0.0;
    const double g_b = grad_shift != nullptr ? static_cast<double>(grad_shift[c]) : 0.0;
    const double inv = static_cast<double>(invstd[c]);
    const double t = g_s - g_b * static_cast<double>(mean[c]);
    const double d_inv = t * (gamma != nullptr ? static_cast<double>(gamma[c]) : 1.0) +
                         (grad_invstd != nullptr ? static_cast<double>(grad_invstd[c]) : 0.0);
    grad_gamma[c] = static_cast<A>(t * inv);
    grad_stats[c] = static_cast<A>(-g_b * static_cast<double>(scale[c]) +
                                   (grad_mean != nullptr ? static_cast<double>(grad_mean[c]) : 0.0));
    grad_stats[channels + c] = static_cast<A>(-d_inv * inv * inv * inv * half_over_n);
  }
}

// Launched as ONE block: every thread reads num_batches_tracked before thread 0 writes the
// incremented value (a barrier orders them; across blocks nothing could).
template <typename A, typename R>
__global__ void bn_update_running_stats_kernel(const A* __restrict__ stats, int64_t channels,
                                               int64_t count, R* __restrict__ running_mean,
                                               R* __restrict__ running_var,
                                               int64_t* num_batches_tracked, bool has_momentum,
                                               double momentum) {
  int64_t tracked = 0;
  if (num_batches_tracked != nullptr) tracked = *num_batches_tracked + 1;
  __syncthreads();
  if (num_batches_tracked != nullptr && threadIdx.x == 0) *num_batches_tracked = tracked;
  const double factor = has_momentum ? momentum : 1.0 / static_cast<double>(tracked);
  const double denom = static_cast<double>(count - 1 > 1 ? count - 1 : 1);
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    // As the reference: the batch values are formed in stats' dtype and cast to the
    // running dtype before the blend.
    const A unbiased = static_cast<A>(static_cast<double>(stats[channels + c]) / denom);
    const double mean = to_double(from_double<R>(static_cast<double>(stats[c])));
    const double var = to_double(from_double<R>(static_cast<double>(unbiased)));
    running_mean[c] =
        from_double<R>(to_double(running_mean[c]) * (1.0 - factor) + factor * mean);
    running_var[c] = from_double<R>(to_double(running_var[c]) * (1.0 - factor) + factor * var);
  }
}

// ---------------------------------------------------------------------------------------
// Launch helpers

struct BlockShape {
  int tx, ty;
};

// TX: a power of two covering the channel vectors (at most 32, one warp-row of them).
inline BlockShape block_shape(int64_t channel_vectors) {
  int tx = 1;
  while (tx < 32 && tx < channel_vectors) tx <<= 1;
  return {tx, kThreads / tx};
}

struct ChunkPlan {
  int64_t chunks;
  int64_t rows_per_chunk;
};

inline ChunkPlan plan_chunks(int64_t rows, int64_t channels) {
  if (rows <= 0) return {0, 1};
  const int64_t tiles = max_<int64_t>(1, ceil_div(channels, kNominalTileChannels));
  const int64_t target = max_<int64_t>(1, kReduceBlocks / tiles);
  int64_t rpc = ceil_div(rows, target);
  rpc = min_(max_(rpc, kMinRowsPerChunk), kMaxRowsPerChunk);
  return {ceil_div(rows, rpc), rpc};
}

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

template <typename T, int V, int U>
void launch_affine(const T* z, const T* residual, T* y, int64_t rows, int64_t channels,
                   const AffineArgs<typename AccOf<T>::type>& args, bool relu,
                   cudaStream_t stream) {
  const int64_t kv = channels / V;
  const BlockShape bs = block_shape(kv);
  const int64_t tiles = ceil_div(kv, bs.tx);
  const int64_t row_blocks = min_(ceil_div(rows, static_cast<int64_t>(bs.ty) * U),
                                  max_<int64_t>(1, kElementwiseBlocks / tiles));
  const dim3 grid(static_cast<unsigned>(row_blocks),
                  static_cast<unsigned>(min_<int64_t>(tiles, kMaxGridY)));
  affine_act_kernel<T, V, U><<<grid, dim3(bs.tx, bs.ty), 0, stream>>>(z, residual, y, rows,
                                                                       channels, tiles, args, relu);
}

template <typename T>
cudaError_t affine_act_impl(const void* z_, const void* res_, void* y_, int64_t rows,
                            int64_t channels, const ChannelAffine& p, bool relu,
                            cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const T* z = static_cast<const T*>(z_);
  const T* res = static_cast<const T*>(res_);
  T* y = static_cast<T*>(y_);
  const AffineArgs<A> args{static_cast<const A*>(p.center),    static_cast<const A*>(p.scale),
                           static_cast<const A*>(p.shift),     static_cast<const A*>(p.res_scale),
                           static_cast<const A*>(p.res_shift), static_cast<A>(p.scale_mul),
                           static_cast<A>(p.shift_mul)};
  constexpr int V = vec_width<T>();
  if (channels % V == 0 && aligned16(z) && aligned16(res) && aligned16(y))
    launch_affine<T, V, 2>(z, res, y, rows, channels, args, relu, stream);
  else
    launch_affine<T, 1, 4>(z, res, y, rows, channels, args, relu, stream);
  return cudaGetLastError();
}

template <typename A>
void launch_stats_merge(const double* ws, const ChunkPlan& plan, int64_t rows, int64_t channels,
                        A* stats, cudaStream_t stream) {
  const int64_t groups = ceil_div(channels, kMergeChannels);
  channel_stats_merge_kernel<A>
      <<<static_cast<unsigned>(min_<int64_t>(groups, kMaxGridY)), dim3(kMergeChannels, kMergeLanes),
         0, stream>>>(ws, plan.chunks, rows, plan.rows_per_chunk, channels, stats);
}

template <typename T, int V, int U>
void launch_stats_partial(const T* z, int64_t rows, int64_t channels, const ChunkPlan& plan,
                          double* ws, cudaStream_t stream) {
  const int64_t kv = channels / V;
  const BlockShape bs = block_shape(kv);
  const int64_t tiles = ceil_div(kv, bs.tx);
  const dim3 grid(static_cast<unsigned>(plan.chunks),
                  static_cast<unsigned>(min_<int64_t>(tiles, kMaxGridY)));
  channel_stats_partial_kernel<T, V, U><<<grid, dim3(bs.tx, bs.ty), 0, stream>>>(
      z, rows, channels, plan.rows_per_chunk, tiles, ws);
}

template <typename T>
cudaError_t channel_stats_impl(const void* z_, int64_t rows, int64_t channels, void* ws_,
                               void* stats_, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  if (channels <= 0) return cudaSuccess;
  const T* z = static_cast<const T*>(z_);
  double* ws = static_cast<double*>(ws_);
  const ChunkPlan plan = plan_chunks(rows, channels);
  if (plan.chunks > kMaxGridX) return cudaErrorInvalidConfiguration;
  if (plan.chunks > 0) {
    constexpr int V = vec_width<T>();
    if (channels % V == 0 && aligned16(z))
      launch_stats_partial<T, V, 4>(z, rows, channels, plan, ws, stream);
    else
      launch_stats_partial<T, 1, 4>(z, rows, channels, plan, ws, stream);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  launch_stats_merge<A>(ws, plan, rows, channels, static_cast<A*>(stats_), stream);
  return cudaGetLastError();
}

template <typename T, int V, int U>
void launch_backward_partial(const T* go, const T* z, const T* res,
                             const BackwardArgs<typename AccOf<T>::type>& args, bool relu,
                             int64_t rows, int64_t channels, const ChunkPlan& plan, T* gz, T* gr,
                             typename AccOf<T>::type* ws, cudaStream_t stream) {
  const int64_t kv = channels / V;
  const BlockShape bs = block_shape(kv);
  const int64_t tiles = ceil_div(kv, bs.tx);
  const dim3 grid(static_cast<unsigned>(plan.chunks),
                  static_cast<unsigned>(min_<int64_t>(tiles, kMaxGridY)));
  bn_add_act_backward_partial_kernel<T, V, U><<<grid, dim3(bs.tx, bs.ty), 0, stream>>>(
      go, z, res, args, relu, rows, channels, plan.rows_per_chunk, tiles, gz, gr, ws);
}

template <typename T>
cudaError_t bn_add_act_backward_impl(const void* go_, const void* z_, const void* res_,
                                     const void* scale, const void* shift, const void* res_scale,
                                     const void* res_shift, bool relu, int64_t rows,
                                     int64_t channels, void* gz_, void* gr_, void* ws_,
                                     void* grad_scale, void* grad_shift, void* grad_res_scale,
                                     cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  if (channels <= 0) return cudaSuccess;
  const T* go = static_cast<const T*>(go_);
  const T* z = static_cast<const T*>(z_);
  const T* res = static_cast<const T*>(res_);
  T* gz = static_cast<T*>(gz_);
  T* gr = static_cast<T*>(gr_);
  A* ws = static_cast<A*>(ws_);
  const BackwardArgs<A> args{static_cast<const A*>(scale), static_cast<const A*>(shift),
                             static_cast<const A*>(res_scale), static_cast<const A*>(res_shift)};
  const ChunkPlan plan = plan_chunks(rows, channels);
  if (plan.chunks > kMaxGridX) return cudaErrorInvalidConfiguration;
  if (plan.chunks > 0) {
    constexpr int V = vec_width<T>();
    if (channels % V == 0 && aligned16(go) && aligned16(z) && aligned16(res) && aligned16(gz) &&
        aligned16(gr))
      launch_backward_partial<T, V, 2>(go, z, res, args, relu, rows, channels, plan, gz, gr, ws,
                                       stream);
    else
      launch_backward_partial<T, 1, 4>(go, z, res, args, relu, rows, channels, plan, gz, gr, ws,
                                       stream);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // The host decides which sums it wants (an empty residual has a null data pointer, so
  // the pointers of the inputs cannot tell when rows == 0).
  SumOutputs<A> outs{{static_cast<A*>(grad_scale), static_cast<A*>(grad_shift),
                      static_cast<A*>(grad_res_scale)}};
  const int64_t groups = ceil_div(channels, kMergeChannels);
  channel_sums_merge_kernel<A>
      <<<static_cast<unsigned>(min_<int64_t>(groups, kMaxGridY)), dim3(kMergeChannels, kMergeLanes),
         0, stream>>>(ws, plan.chunks, channels, outs);
  return cudaGetLastError();
}

template <typename A, typename R>
cudaError_t bn_update_impl(const void* stats, int64_t channels, int64_t count, void* rm, void* rv,
                           int64_t* nbt, bool has_momentum, double momentum, cudaStream_t stream) {
  // Always launched, even for zero channels: num_batches_tracked still counts the batch.
  bn_update_running_stats_kernel<A, R><<<1, kThreads, 0, stream>>>(
      static_cast<const A*>(stats), channels, count, static_cast<R*>(rm), static_cast<R*>(rv), nbt,
      has_momentum, momentum);
  return cudaGetLastError();
}

template <typename A>
cudaError_t bn_update_dispatch_running(DType running, const void* stats, int64_t channels,
                                       int64_t count, void* rm, void* rv, int64_t* nbt,
                                       bool has_momentum, double momentum, cudaStream_t stream) {
  switch (running) {
    case DType::Float32:
      return bn_update_impl<A, float>(stats, channels, count, rm, rv, nbt, has_momentum, momentum,
                                      stream);
    case DType::Float64:
      return bn_update_impl<A, double>(stats, channels, count, rm, rv, nbt, has_momentum, momentum,
                                       stream);
    case DType::Float16:
      return bn_update_impl<A, __half>(stats, channels, count, rm, rv, nbt, has_momentum, momentum,
                                       stream);
    case DType::BFloat16:
      return bn_update_impl<A, __nv_bfloat16>(stats, channels, count, rm, rv, nbt, has_momentum,
                                              momentum, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Public launchers

cudaError_t affine_act(DType dtype, const void* z, const void* residual, void* y, int64_t rows,
                       int64_t channels, const ChannelAffine& params, bool relu,
                       cudaStream_t stream) {
  if (rows <= 0 || channels <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return affine_act_impl<float>(z, residual, y, rows, channels, params, relu, stream);
    case DType::Float16:
      return affine_act_impl<__half>(z, residual, y, rows, channels, params, relu, stream);
    case DType::BFloat16:
      return affine_act_impl<__nv_bfloat16>(z, residual, y, rows, channels, params, relu, stream);
    case DType::Float64:
      return affine_act_impl<double>(z, residual, y, rows, channels, params, relu, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t reduce_chunks(int64_t rows, int64_t channels) { return plan_chunks(rows, channels).chunks; }

cudaError_t channel_stats(DType dtype, const void* z, int64_t rows, int64_t channels,
                          void* workspace, void* stats, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return channel_stats_impl<float>(z, rows, channels, workspace, stats, stream);
    case DType::Float16:
      return channel_stats_impl<__half>(z, rows, channels, workspace, stats, stream);
    case DType::BFloat16:
      return channel_stats_impl<__nv_bfloat16>(z, rows, channels, workspace, stats, stream);
    case DType::Float64:
      return channel_stats_impl<double>(z, rows, channels, workspace, stats, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t channel_stats_merge(DType acc, const void* workspace, int64_t chunks, int64_t rows,
                                int64_t rows_per_chunk, int64_t channels, void* stats,
                                cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  if (rows_per_chunk < 1 || chunks != ceil_div(rows, rows_per_chunk)) return cudaErrorInvalidValue;
  const ChunkPlan plan{chunks, rows_per_chunk};
  const double* ws = static_cast<const double*>(workspace);
  if (acc == DType::Float32)
    launch_stats_merge<float>(ws, plan, rows, channels, static_cast<float*>(stats), stream);
  else if (acc == DType::Float64)
    launch_stats_merge<double>(ws, plan, rows, channels, static_cast<double*>(stats), stream);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

cudaError_t bn_add_act_backward(DType dtype, const void* grad_out, const void* z,
                                const void* residual, const void* scale, const void* shift,
                                const void* res_scale, const void* res_shift, bool relu,
                                int64_t rows, int64_t channels, void* grad_z, void* grad_residual,
                                void* workspace, void* grad_scale, void* grad_shift,
                                void* grad_res_scale, cudaStream_t stream) {
#define FUSED_RESNET_BWD_CASE(ENUM, T)                                                          \
  case DType::ENUM:                                                                             \
    return bn_add_act_backward_impl<T>(grad_out, z, residual, scale, shift, res_scale,          \
                                       res_shift, relu, rows, channels, grad_z, grad_residual, \
                                       workspace, grad_scale, grad_shift, grad_res_scale,       \
                                       stream);
  switch (dtype) {
    FUSED_RESNET_BWD_CASE(Float32, float)
    FUSED_RESNET_BWD_CASE(Float16, __half)
    FUSED_RESNET_BWD_CASE(BFloat16, __nv_bfloat16)
    FUSED_RESNET_BWD_CASE(Float64, double)
  }
#undef FUSED_RESNET_BWD_CASE
  return cudaErrorInvalidValue;
}

cudaError_t bn_finalize(DType acc, const void* stats, int64_t channels, int64_t count,
                        const void* gamma, const void* beta, double eps, void* scale, void* shift,
                        void* save_mean, void* save_invstd, cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(min_<int64_t>(ceil_div(channels, kThreads), kMaxGridY));
  const double n = static_cast<double>(count);
  if (acc == DType::Float32) {
    bn_finalize_kernel<float><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(stats), channels, n, static_cast<const float*>(gamma),
        static_cast<const float*>(beta), eps, static_cast<float*>(scale), static_cast<float*>(shift),
        static_cast<float*>(save_mean), static_cast<float*>(save_invstd));
  } else if (acc == DType::Float64) {
    bn_finalize_kernel<double><<<blocks, kThreads, 0, stream>>>(
        static_cast<const double*>(stats), channels, n, static_cast<const double*>(gamma),
        static_cast<const double*>(beta), eps, static_cast<double*>(scale),
        static_cast<double*>(shift), static_cast<double*>(save_mean),
        static_cast<double*>(save_invstd));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename A>
static cudaError_t launch_bn_finalize_backward(const void* grad_scale, const void* grad_shift,
                                               const void* grad_mean, const void* grad_invstd,
                                               const void* gamma, const void* scale, const void* mean,
                                               const void* invstd, int64_t channels, int64_t count,
                                               void* grad_stats, void* grad_gamma, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(min_<int64_t>(ceil_div(channels, kThreads), kMaxGridY));
  bn_finalize_backward_kernel<A><<<blocks, kThreads, 0, stream>>>(
      static_cast<const A*>(grad_scale), static_cast<const A*>(grad_shift), static_cast<const A*>(grad_mean),
      static_cast<const A*>(grad_invstd), static_cast<const A*>(gamma),
      static_cast<const A*>(scale), static_cast<const A*>(mean), static_cast<const A*>(invstd), channels,
      0.5 / static_cast<double>(count), static_cast<A*>(grad_stats), static_cast<A*>(grad_gamma));
  return cudaGetLastError();
}

cudaError_t bn_finalize_backward(DType acc, const void* grad_scale, const void* grad_shift,
                                 const void* grad_mean, const void* grad_invstd,
                                 const void* gamma, const void* scale, const void* mean,
                                 const void* invstd, int64_t channels, int64_t count,
                                 void* grad_stats, void* grad_gamma, cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  if (acc == DType::Float32) {
    return launch_bn_finalize_backward<float>(grad_scale, grad_shift, grad_mean, grad_invstd, gamma, scale, mean, invstd, channels,
                                              count, grad_stats, grad_gamma, stream);
  }
  if (acc == DType::Float64) {
    return launch_bn_finalize_backward<double>(grad_scale, grad_shift, grad_mean, grad_invstd, gamma, scale, mean, invstd, channels,
                                               count, grad_stats, grad_gamma, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t bn_update_running_stats(DType stats_dtype, const void* stats, int64_t channels,
                                    int64_t count, DType running_dtype, void* running_mean,
                                    void* running_var, int64_t* num_batches_tracked,
                                    bool has_momentum, double momentum, cudaStream_t stream) {
  if (stats_dtype == DType::Float32)
    return bn_update_dispatch_running<float>(running_dtype, stats, channels, count, running_mean,
                                             running_var, num_batches_tracked, has_momentum,
                                             momentum, stream);
  if (stats_dtype == DType::Float64)
    return bn_update_dispatch_running<double>(running_dtype, stats, channels, count, running_mean,
                                              running_var, num_batches_tracked, has_momentum,
                                              momentum, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fused_resnet
