// Launchers for fused_resnet's CUDA kernels (implemented in kernels.cu).
//
// Plain C++ on purpose: no torch/ATen/c10 types cross this boundary, so kernels.cu is
// compiled by nvcc without the torch headers (fast) and ops_cuda.cpp, the only file that
// talks to ATen, is compiled by the host compiler.
//
// Layout every launcher assumes: an activation is a dense row-major [rows, channels]
// matrix, i.e. an NHWC (channels_last-contiguous) tensor with rows = N*H*W. Per-channel
// vectors, statistics and workspaces are dense and in the accumulation dtype (float, or
// double for Float64 activations). Pointers of absent optional inputs are nullptr.
//
// Every launcher enqueues on `stream` only, never synchronizes and never allocates, so
// calls can be captured into a CUDA graph. Zero-sized problems launch nothing (or only
// what is needed to write a well-defined result). The return value is
// cudaGetLastError() after the last launch (cudaSuccess when nothing was launched).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fused_resnet {
namespace cuda {

// Activation dtype of a call (our own enum: keeps ATen out of kernels.cu).
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// Per-channel parameters of the elementwise family
//   y = act((z - center) * (scale * scale_mul) + shift * shift_mul
//           (+ residual * res_scale + res_shift))
// Pointers are to `channels` values in the accumulation dtype; a null pointer means the
// identity value (center 0, scale 1, shift 0, res_scale 1, res_shift 0). The multipliers
// exist for stats_backward (2 * grad_M2 and grad_mean / count) and are 1 elsewhere.
struct ChannelAffine {
  const void* center = nullptr;
  const void* scale = nullptr;
  double scale_mul = 1.0;
  const void* shift = nullptr;
  double shift_mul = 1.0;
  const void* res_scale = nullptr;
  const void* res_shift = nullptr;
};

// The one elementwise kernel: conv_bn_act's epilogue (in place: y == z allowed),
// conv_stats' prologue, bn_add_act and stats_backward. z, residual (optional) and y are
// [rows, channels] in `dtype`; relu uses `v < 0 ? 0 : v` so NaN propagates like torch.relu.
cudaError_t affine_act(DType dtype, const void* z, const void* residual, void* y, int64_t rows,
                       int64_t channels, const ChannelAffine& params, bool relu,
                       cudaStream_t stream);

// Number of row chunks the deterministic reductions split `rows` into. It depends on the
// shape only, so results are bitwise reproducible. Workspaces hold chunks * 2 * channels
// doubles for channel_stats and chunks * 3 * channels accumulation-dtype values for
// bn_add_act_backward.
int64_t reduce_chunks(int64_t rows, int64_t channels);

// Per-channel (mean, M2) of z [rows, channels] into stats (2, channels, accumulation dtype):
// Welford within a block on values shifted by the chunk's first row (accurate when
// |mean| >> std), per-chunk partials into `workspace` (doubles), then Chan's merge in double
// over chunks in a fixed order. rows == 0 gives mean NaN and M2 0 (as the mean of an empty
// tensor).
cudaError_t channel_stats(DType dtype, const void* z, int64_t rows, int64_t channels,
                          void* workspace, void* stats, cudaStream_t stream);

// The second half of channel_stats on its own: merges per-chunk (mean, M2) partials
// workspace[chunk][2][channels] (doubles; chunk i covers rows [i * rows_per_chunk,
// min(rows, (i + 1) * rows_per_chunk)), chunks == ceil(rows / rows_per_chunk)) into stats
// (2, channels) of dtype `acc` (Float32 or Float64) by the same fixed-order Chan merge.
// Used by producers that write their own partials (igemm.cu's statistics epilogue).
cudaError_t channel_stats_merge(DType acc, const void* workspace, int64_t chunks, int64_t rows,
                                int64_t rows_per_chunk, int64_t channels, void* stats,
                                cudaStream_t stream);

// One pass of bn_add_act's backward. With pre = z*scale + shift (+ residual*res_scale +
// res_shift) recomputed exactly as affine_act computes it and g = relu ? (pre > 0 ? go : 0)
// : go: writes grad_z = g*scale, grad_residual = g*res_scale (when residual is given) and
// the per-channel sums grad_scale = sum(g*z), grad_shift = sum(g),
// grad_res_scale = sum(g*residual) (only when residual and res_scale are given; pass
// nullptr otherwise; the launcher writes exactly the sums whose pointers are non-null).
// Sums are deterministic (same partial + fixed-order merge scheme).
cudaError_t bn_add_act_backward(DType dtype, const void* grad_out, const void* z,
                                const void* residual, const void* scale, const void* shift,
                                const void* res_scale, const void* res_shift, bool relu,
                                int64_t rows, int64_t channels, void* grad_z, void* grad_residual,
                                void* workspace, void* grad_scale, void* grad_shift,
                                void* grad_res_scale, cudaStream_t stream);

// bn_finalize for `channels` channels; `acc` is stats' dtype (Float32 or Float64), which all
// vectors share. gamma/beta may be null (1 and 0). Computed in double, rounded once.
cudaError_t bn_finalize(DType acc, const void* stats, int64_t channels, int64_t count,
                        const void* gamma, const void* beta, double eps, void* scale, void* shift,
                        void* save_mean, void* save_invstd, cudaStream_t stream);

// bn_finalize's backward: grad_stats (2, channels) = (d mean, d M2) and grad_gamma from the
// gradients of scale, shift, save_mean and save_invstd (any may be null = 0); gamma may be
// null (1). Same dtype rules as bn_finalize; computed in double, rounded once.
cudaError_t bn_finalize_backward(DType acc, const void* grad_scale, const void* grad_shift,
                                 const void* grad_mean, const void* grad_invstd, const void* gamma,
                                 const void* scale, const void* mean, const void* invstd,
                                 int64_t channels, int64_t count,
                                 void* grad_stats, void* grad_gamma, cudaStream_t stream);

// nn.BatchNorm2d's running-stats update, in place. Increments *num_batches_tracked first
// when it is non-null; without a momentum the factor is 1 / num_batches_tracked, read on
// the device (no host sync). stats: (2, channels) in `stats_dtype` (Float32/Float64);
// running_mean/running_var: `channels` values of `running_dtype`.
cudaError_t bn_update_running_stats(DType stats_dtype, const void* stats, int64_t channels,
                                    int64_t count, DType running_dtype, void* running_mean,
                                    void* running_var, int64_t* num_batches_tracked,
                                    bool has_momentum, double momentum, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_resnet
