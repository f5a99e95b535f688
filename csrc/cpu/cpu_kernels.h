// Internal interface between the CPU translation units (conv.cpp, bn.cpp).
//
// Every kernel works on channels_last-contiguous activations viewed as a row-major
// (M, K) matrix: M = N*H*W pixels, K channels, element (m, k) at data[m*K + k]. That view
// is valid for any tensor for which is_contiguous(ChannelsLast) holds, even when a size-1
// dimension carries a non-canonical stride, because such a stride never moves the address.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace fused_resnet {
namespace cpu {

// Reductions split the pixel range into chunks of this many rows regardless of the number
// of threads, and merge the chunk results in chunk order: the result is then bitwise the
// same for any thread count.
constexpr int64_t kChunkRows = 256;

// On the channel loops of the kernels: their arrays are distinct buffers (or, in place, the
// same element read then written), which the compiler cannot prove, and with this many
// pointers it gives up on run-time alias checks and does not vectorize.
#if defined(__clang__)
#define FUSED_RESNET_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define FUSED_RESNET_IVDEP _Pragma("GCC ivdep")
#else
#define FUSED_RESNET_IVDEP
#endif

// Run-time ISA choice for the elementwise and reduction row loops. The extension is built
// with the compiler's baseline flags (x86-64: SSE2, 4 floats or 2 doubles per vector), so each
// hot row loop is compiled twice: its body as an always-inline template, instantiated once
// plainly and once inside a function carrying target("avx2") (8 floats per vector), chosen per
// call by cpu_has_avx2(). FMA is deliberately not enabled: without it the compiler cannot
// contract a*b+c, so both versions round every operation exactly as the reference's separate
// multiply and add do, and the two versions give the same bits (vectorization runs across
// channels; every per-channel accumulation keeps its sequential row order).
// float16 / bfloat16 tensors run the float32 instantiation of a row body on float32 staging
// blocks (lowp.h), whose conversions have their own AVX2 (+F16C) version.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FUSED_RESNET_HAVE_AVX2_CLONES 1
#define FUSED_RESNET_TARGET_AVX2 __attribute__((target("avx2")))
#define FUSED_RESNET_ALWAYS_INLINE inline __attribute__((always_inline))
// FUSED_RESNET_CPU_AVX2=0 (read per call, a getenv) forces the baseline version: tests use it
// to check that both versions give the same bits.
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  if (!has) return false;
  const char* v = std::getenv("FUSED_RESNET_CPU_AVX2");
  return v == nullptr || std::strcmp(v, "0") != 0;
}
#else
#define FUSED_RESNET_HAVE_AVX2_CLONES 0
#define FUSED_RESNET_TARGET_AVX2
#define FUSED_RESNET_ALWAYS_INLINE inline
inline bool cpu_has_avx2() { return false; }
#endif

// Rounds an accumulation-type value to the activation dtype: static_cast, except for
// bfloat16, where c10's round-to-nearest-even branches on NaN and so keeps the channel loops
// from vectorizing. Same bits as c10 (0x7FC0 for NaN, RNE otherwise), as a select.
template <typename scalar_t, typename acc_t>
inline scalar_t round_to(acc_t v) {
  return static_cast<scalar_t>(v);
}
template <>
inline c10::BFloat16 round_to<c10::BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rne = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  const uint16_t bits = static_cast<uint16_t>(v != v ? 0x7FC0u : rne);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// Work per parallel task of about 32K elements (at::internal::GRAIN_SIZE): rows of k
// channels for elementwise passes, chunks of rows for the chunked reductions.
inline int64_t row_grain(int64_t k) {
  return std::max<int64_t>(1, int64_t{32768} / std::max<int64_t>(k, 1));
}
inline int64_t chunk_grain(int64_t k) { return std::max<int64_t>(1, row_grain(k) / kChunkRows); }

// The dispatcher picks this kernel when some argument is a CPU tensor; the others are
// checked against x/z/stats by check_like / check_vector. This makes the device contract
// explicit for the one argument everything else is compared to.
inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor (CPU kernel), got device ",
              t.device());
}

// A channels_last-contiguous copy of an activation input (the input itself when it already is).
inline at::Tensor channels_last_input(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

// A fresh tensor (not an input) returned as an op output: give it exactly the strides
// at::empty(..., ChannelsLast) gives, so that outputs match the fake kernels stride for stride.
// ATen's convolution may return e.g. (K, 1, 1, 1) instead of (K, 1, K, K) for a 1x1 output,
// which is channels_last-contiguous but has different strides; restriding it is free.
at::Tensor canonical_channels_last(const at::Tensor& t);

// out = act(z * scale + shift (+ residual * res_scale + res_shift)), the elementwise math in
// the accumulation type and rounded once. `out` may be `z` itself (in place). residual,
// res_scale, res_shift may be undefined (absent; absent res_scale is 1, res_shift 0).
// z, residual, out: channels_last-contiguous, same shape and dtype; vectors: (K,) contiguous
// in the accumulation dtype.
void affine_add_act(const at::Tensor& out, const at::Tensor& z, const at::Tensor& scale,
                    const at::Tensor& shift, const at::Tensor& residual,
                    const at::Tensor& res_scale, const at::Tensor& res_shift, bool relu);

// conv_bn_act through oneDNN with the epilogue as post-ops and folded, pre-packed, cached
// weights (onednn.cpp, which documents the cache and the numerics). x and residual
// (undefined when absent): channels_last-contiguous; scale, shift: (K,) float32. Returns the
// channels_last result, or an undefined tensor when the fast path does not apply (dtype other
// than float32, empty tensors, oneDNN missing/disabled/rejecting the call, or
// FUSED_RESNET_CPU_ONEDNN=0); the caller then runs the unfused path. into_residual: the result
// is accumulated into residual's memory (defined, channels_last-contiguous, not overlapping x)
// and residual is returned.
at::Tensor conv_bn_act_onednn(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& residual, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                              bool into_residual = false);

}  // namespace cpu
}  // namespace fused_resnet
