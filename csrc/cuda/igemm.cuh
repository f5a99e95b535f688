// Launchers of the tensor-core implicit-GEMM convolution (implemented in igemm.cu).
//
// Same conventions as kernels.cuh: plain C++ at the boundary (no ATen), every launcher
// enqueues on `stream` only, never synchronizes or allocates (CUDA-graph capturable), and
// returns cudaGetLastError() after its last launch.
//
// STATUS: compiled and resource-checked (csrc/README.md) and its index math is emulated on
// the host (tests/test_igemm_host.py), but NOT YET RUN ON A GPU. ops_cuda.cpp uses it only
// when FUSED_RESNET_CUDA_CONV=igemm is set; cuDNN stays the default until tests/gpu passes.
//
// Layouts: x is NHWC (N, H, W, C) dense; w is (K, R, S, C / groups) dense (the channels_last-
// contiguous PyTorch weight); y / z / residual are NHWC (N, P, Q, K) dense; scale and shift
// are K floats, in_scale / in_shift C floats (global channel indices for every group). All
// activation and weight pointers must be 16-byte aligned. dtype Float16, BFloat16 or Float32
// (TF32); all three accumulate in float32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"

namespace fused_resnet {
namespace cuda {

struct IgemmConv {
  const void* x = nullptr;
  const void* w = nullptr;
  int64_t n = 0, h = 0, w_in = 0, c = 0;  // input (N, H, W, C)
  int64_t k = 0;                          // output channels
  int64_t r = 0, s = 0;                   // filter size
  int64_t p = 0, q = 0;                   // output size
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  // Grouped convolution: C / groups input and K / groups output channels a group; w is then
  // (K, R, S, C / groups) dense. x's channel stride stays C, y's K.
  int64_t groups = 1;
};

// True when the kernel handles this call: dtype Float16/BFloat16 (mma.m16n8k16) or Float32
// (TF32 math: mma.m16n8k8 .tf32 with operands rounded to TF32 -- the CALLER decides whether
// TF32 is allowed, see ops_cuda.cpp); C and K divisible by groups and C / groups, K / groups
// multiples of the 16-byte vector (8 elements for 16-bit dtypes, 4 for float32);
// R*S*C/groups < 2^31, spatial sizes and hyper-parameters that fit int32, groups *
// ceil(K / groups / 64) <= 65535, 16-byte aligned x / w. (Same device and compute
// capability >= 8.0 are the caller's checks.)
bool igemm_supported(DType dtype, const IgemmConv& conv);

// Rows of output pixels per statistics chunk (the CTA tile height) and the chunk count of
// a conv_stats call: the workspace holds igemm_stats_chunks(rows) * 2 * K doubles.
int64_t igemm_stats_chunks(int64_t rows);

// conv_bn_act: y = relu?(conv(x, w) * scale[k] + shift[k] (+ residual)), accumulated in
// float32, rounded once to the dtype. residual may be null.
cudaError_t igemm_conv_bn_act(DType dtype, const IgemmConv& conv, const float* scale,
                              const float* shift, const void* residual, bool relu, void* y,
                              cudaStream_t stream);

// conv_stats: z = conv(t(x), w) rounded to the dtype with the prologue
// t(x) = relu?(x * in_scale[c] + in_shift[c]) (float FMA, rounded to the dtype; in_scale /
// in_shift may be null = 1 / 0; no prologue when both are null and in_relu is false) and
// zero padding applied AFTER t; and stats (2, K) float32 = per-channel (mean, M2) of the
// rounded z: per-(128-row tile, channel) two-pass partials in double, then kernels.cu's
// fixed-order Chan merge (deterministic, no atomics). Two launches.
cudaError_t igemm_conv_stats(DType dtype, const IgemmConv& conv, const float* in_scale,
                             const float* in_shift, bool in_relu, void* z, void* workspace,
                             float* stats, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_resnet
