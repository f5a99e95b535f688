// float16 row loops, staged through float32 buffers (shared by bn.cpp and conv.cpp).
//
// Every elementwise/reduction kernel computes in the accumulation type, float for float16 and
// bfloat16: each element is widened exactly to float, the math runs in float, and the result is
// rounded once to the activation dtype. Written directly on c10::Half rows those loops ran 7-20x
// slower than float32: this extension is compiled without F16C, so c10::Half <-> float is c10's
// software conversion, whose selects GCC turns into branches ("control flow in loop"), and the
// loops do not vectorize. bfloat16's conversions (a shift, round_to) do vectorize inside a direct
// loop, which is faster than staging (no float32 round trip through buffers: staged bfloat16
// measured 1.3-2x slower), so bfloat16 rows are processed directly like float32's.
//
// So a float16 kernel runs its float32 row body (the very instantiation float32 tensors use,
// AVX2 or baseline) on staged blocks: `staged_rows` widens each block of input rows into float32
// buffers, calls the body on them, and rounds the output buffers back into the tensors. The block
// conversions are the only float16 code:
//   AVX2 version, CPU with F16C: vcvtph2ps / vcvtps2ph (round to nearest even), 8 per instruction;
//   otherwise (and in the baseline version): c10's conversion, value by value.
// c10's conversion as compiled here (no -mf16c) maps every float NaN to sign | 0x7E00, while
// vcvtps2ph keeps the top payload bits, so NaNs are made canonical (sign | 0x7FC00000) before
// vcvtps2ph: the result is then the same 16 bits for every input (tests/test_cpu_lowp.py runs all
// 65536 float16 inputs through both versions).
//
// Results are therefore bitwise those of the former direct loops: same float math on the same
// widened values, same single rounding. Block size: about kStageElems values per buffer, whole
// rows, a multiple of the row count the body needs (bn_add_act_backward's float64 sum blocks).
#pragma once

#include "cpu_kernels.h"

#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <type_traits>

#if FUSED_RESNET_HAVE_AVX2_CLONES
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace fused_resnet {
namespace cpu {

// Whether rows of T run staged (float16) rather than directly (float32, float64, bfloat16).
template <typename T>
inline constexpr bool kStagedRows = std::is_same_v<T, c10::Half>;

// ---------------------------------------------------------------------------------------------
// Span conversions of n contiguous values

// c10's conversion: the baseline version, and the tails of the F16C loops.
inline void widen_c10(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void narrow_c10(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = round_to<c10::Half>(src[i]);
}

#if FUSED_RESNET_HAVE_AVX2_CLONES
// F16C needs the AVX (VEX) state the AVX2 check already requires; every AVX2 CPU made has it,
// but it is a separate CPUID bit (leaf 1, ECX bit 29), so it is checked -- with cpuid itself:
// older GCC and clang do not know "f16c" in __builtin_cpu_supports.
inline bool cpu_has_f16c() {
  static const bool has = [] {
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0;
  }();
  return has;
}

__attribute__((target("avx2,f16c"))) inline void widen_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  widen_c10(src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) inline void narrow_f16c(const float* src, c10::Half* dst, int64_t n) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 quiet_nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    // NaN -> sign | canonical quiet NaN, which vcvtps2ph turns into sign | 0x7E00 as c10 does.
    const __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    v = _mm256_blendv_ps(v, _mm256_or_ps(_mm256_and_ps(v, sign_bit), quiet_nan), is_nan);
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  narrow_c10(src + i, dst + i, n - i);
}
#endif

// dst[0, n) = float(src[0, n)), exact. avx2: the caller's cpu_has_avx2() for this call.
inline void widen(const c10::Half* src, float* dst, int64_t n, bool avx2) {
#if FUSED_RESNET_HAVE_AVX2_CLONES
  if (avx2 && cpu_has_f16c()) return widen_f16c(src, dst, n);
#else
  (void)avx2;
#endif
  widen_c10(src, dst, n);
}

// dst[0, n) = src[0, n) rounded to float16 (round_to's, i.e. c10's, bits).
inline void narrow(const float* src, c10::Half* dst, int64_t n, bool avx2) {
#if FUSED_RESNET_HAVE_AVX2_CLONES
  if (avx2 && cpu_has_f16c()) return narrow_f16c(src, dst, n);
#else
  (void)avx2;
#endif
  narrow_c10(src, dst, n);
}

// ---------------------------------------------------------------------------------------------
// Staging

// Values per staging buffer (16 KiB of float32): a few buffers stay in L1/L2 between the widening,
// the body and the rounding.
constexpr int64_t kStageElems = 4096;

// Rows per staged block for rows of k values: about kStageElems values, at least `multiple` rows
// and a multiple of it.
inline int64_t stage_rows(int64_t k, int64_t multiple = 1) {
  const int64_t rows = kStageElems / std::max<int64_t>(k, 1);
  return std::max<int64_t>(multiple, rows / multiple * multiple);
}

// The float32 buffers of one parallel task (uninitialized, grown on demand), reused by every
// staged_rows call of the task.
class StageScratch {
 public:
  float* get(int64_t n) {
    if (n > size_) {
      data_.reset(new float[static_cast<size_t>(n)]);
      size_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<float[]> data_;
  int64_t size_ = 0;
};

// Rows [r0, r1) of float16 (M, k) row-major matrices (row r at r * k), in blocks of
// `block` rows from r0: widens each block of every input (nullptr: absent, passed on as nullptr)
// into a float32 buffer, calls body(in, out, nrows) with in/out the float32 blocks (row 0 = row
// b0 of the block; an absent output is nullptr), then rounds every present output block into its
// tensor. An output may alias an input (in place): a block is read before it is written.
template <size_t kIn, size_t kOut, typename Body>
void staged_rows(StageScratch& scratch, const std::array<const c10::Half*, kIn>& in,
                 const std::array<c10::Half*, kOut>& out, int64_t k, int64_t r0, int64_t r1, int64_t block, bool avx2,
                 Body&& body) {
  const int64_t cap = block * k;
  float* buf = scratch.get(static_cast<int64_t>(kIn + kOut) * cap);
  std::array<const float*, kIn> fin{};
  std::array<float*, kOut> fout{};
  for (size_t o = 0; o < kOut; ++o) fout[o] = out[o] != nullptr ? buf + (kIn + o) * cap : nullptr;
  for (int64_t b0 = r0; b0 < r1; b0 += block) {
    const int64_t nb = std::min(block, r1 - b0);
    const int64_t n = nb * k;
    for (size_t i = 0; i < kIn; ++i) {
      float* d = buf + i * cap;
      if (in[i] != nullptr) widen(in[i] + b0 * k, d, n, avx2);
      fin[i] = in[i] != nullptr ? d : nullptr;
    }
    body(fin, fout, nb);
    for (size_t o = 0; o < kOut; ++o) {
      if (out[o] != nullptr) narrow(fout[o], out[o] + b0 * k, n, avx2);
    }
  }
}

}  // namespace cpu
}  // namespace fused_resnet
