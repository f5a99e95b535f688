// CPU kernels of the convolution ops: conv_bn_act and conv_stats.
// Meaning of each op: fused_resnet/reference.py; schemas: csrc/ops.cpp.
//
// conv_bn_act in float32 runs as one oneDNN convolution with fused post-ops and folded,
// pre-packed weights (onednn.cpp). Everywhere else the convolution is ATen's (oneDNN on CPU)
// and what is fused here is everything around it: the prologue relu?(x * in_scale + in_shift) in one pass that also does the layout
// change, the folded-BN epilogue written in place into the fresh conv output, and the
// per-channel (mean, M2) of z in one deterministic pass. float16 rows of the prologue and the
// statistics run the float32 loops on float32 staging blocks (lowp.h).
#include "cpu_kernels.h"
#include "lowp.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace fused_resnet {
namespace cpu {
namespace {

// z = conv(xin, w) as a channels_last tensor with canonical strides. x has channels_last
// memory so ATen picks its NHWC path, whose output is already channels_last (then free).
at::Tensor convolve(const at::Tensor& xin, const at::Tensor& w, const ConvGeometry& geo,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    int64_t groups) {
  if (xin.size(1) == 0) {
    // Nothing to sum over: every output is 0 (ATen mis-shapes this case).
    return at::zeros(geo.out_shape, xin.options().memory_format(at::MemoryFormat::ChannelsLast));
  }
  const std::array<int64_t, 2> no_output_padding{0, 0};
  at::Tensor z = at::convolution(xin, w, /*bias=*/{}, stride, padding, dilation,
                                 /*transposed=*/false, no_output_padding, groups);
  TORCH_INTERNAL_ASSERT(z.sizes() == at::IntArrayRef(geo.out_shape), "convolution returned shape ",
                        z.sizes(), ", expected ", at::IntArrayRef(geo.out_shape));
  return canonical_channels_last(z);
}

// ---------------------------------------------------------------------------------------------
// Prologue: out = relu?(x * in_scale + in_shift) rounded to x's dtype, read from x with any
// strides and written channels_last-contiguous, so the layout change costs no extra pass.

// x as rows: row r = (n, h, w) pixel, its c channels at x + n*sn + h*sh + w*sw + j*sc.
template <typename scalar_t>
struct PrologueArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  int64_t h, w, c;
  int64_t sn, sc, sh, sw;
  const acc_t* scale;
  const acc_t* shift;
  bool relu;
  scalar_t* out;  // channels_last-contiguous: row r at out + r*c
};

// Rows [r0, r1). The channel stride as a compile-time 1 in the common (channels_last input) case
// lets the inner loop vectorize; other layouts take the strided gather.
template <typename scalar_t, bool kUnit>
FUSED_RESNET_ALWAYS_INLINE void prologue_rows(const PrologueArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t zero(0);
  const int64_t c = a.c, h = a.h, w = a.w;
  const acc_t* in_scale = a.scale;
  const acc_t* in_shift = a.shift;
  const bool relu = a.relu;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t iw = r % w, ih = (r / w) % h, in = r / (w * h);
    const scalar_t* src = a.x + in * a.sn + ih * a.sh + iw * a.sw;
    scalar_t* dst = a.out + r * c;
    FUSED_RESNET_IVDEP
    for (int64_t j = 0; j < c; ++j) {
      const acc_t v = static_cast<acc_t>(src[kUnit ? j : j * a.sc]) * in_scale[j] + in_shift[j];
      dst[j] = round_to<scalar_t>(relu ? std::max(v, zero) : v);
    }
  }
}

// The unit-stride loop has an AVX2 version; the strided gather only the baseline one.
template <typename scalar_t>
FUSED_RESNET_TARGET_AVX2 void prologue_rows_avx2(const PrologueArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  prologue_rows<scalar_t, true>(a, r0, r1);
}

template <typename scalar_t>
void prologue_rows_base(const PrologueArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  prologue_rows<scalar_t, true>(a, r0, r1);
}

template <typename scalar_t>
void prologue_rows_strided(const PrologueArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  prologue_rows<scalar_t, false>(a, r0, r1);
}

// Rows [0, m). float32 / float64 / bfloat16 straight from x with its strides. float16 from a
// channels_last-contiguous x (row r at x + r*c; the caller makes x so) in staged blocks, each
// run as a float32 channels_last block of one image row of nb pixels.
template <typename scalar_t>
void prologue_impl(const PrologueArgs<scalar_t>& a, int64_t m) {
  const bool avx2 = cpu_has_avx2();
  const int64_t c = a.c;
  if constexpr (kStagedRows<scalar_t>) {
    const auto rows = avx2 ? &prologue_rows_avx2<float> : &prologue_rows_base<float>;
    at::parallel_for(0, m, row_grain(c), [&](int64_t r0, int64_t r1) {
      StageScratch scratch;
      staged_rows<1, 1>(scratch, {a.x}, {a.out}, c, r0, r1, stage_rows(c), avx2,
                        [&](const auto& in, const auto& out, int64_t nb) {
                          rows({in[0], 1, nb, c, nb * c, 1, nb * c, c, a.scale, a.shift, a.relu, out[0]},
                               0, nb);
                        });
    });
  } else {
    const auto rows = a.sc != 1 ? &prologue_rows_strided<scalar_t>
                      : avx2    ? &prologue_rows_avx2<scalar_t>
                                : &prologue_rows_base<scalar_t>;
    at::parallel_for(0, m, row_grain(c), [&](int64_t r0, int64_t r1) { rows(a, r0, r1); });
  }
}

at::Tensor prologue(const at::Tensor& x, const c10::optional<at::Tensor>& in_scale,
                    const c10::optional<at::Tensor>& in_shift, bool relu) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t c = x.size(1);
  const int64_t m = x.size(0) * x.size(2) * x.size(3);
  if (m == 0 || c == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_stats_prologue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Absent scale/shift as identity vectors: x * 1 + 0 == x exactly, one loop for all cases.
    std::vector<acc_t> ones(in_scale.has_value() ? 0 : c, acc_t(1));
    std::vector<acc_t> zeros(in_shift.has_value() ? 0 : c, acc_t(0));
    at::Tensor s, b;
    if (in_scale.has_value()) s = in_scale->contiguous();
    if (in_shift.has_value()) b = in_shift->contiguous();
    // float16 stages contiguous rows: another layout is first copied to channels_last (ATen's
    // copy, one extra pass over x), then transformed from there.
    const at::Tensor xs = kStagedRows<scalar_t> ? channels_last_input(x) : x;
    const PrologueArgs<scalar_t> args{xs.const_data_ptr<scalar_t>(),
                                      xs.size(2),
                                      xs.size(3),
                                      c,
                                      xs.stride(0),
                                      xs.stride(1),
                                      xs.stride(2),
                                      xs.stride(3),
                                      s.defined() ? s.const_data_ptr<acc_t>() : ones.data(),
                                      b.defined() ? b.const_data_ptr<acc_t>() : zeros.data(),
                                      relu,
                                      out.mutable_data_ptr<scalar_t>()};
    prologue_impl<scalar_t>(args, m);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Per-channel mean and M2 of z, viewed as (M, K) rows.
//
// Each fixed chunk of kChunkRows rows is summed in double around a shift (the chunk's first
// row), so the sums stay small even when |mean| >> std: mean = shift + s1/n,
// M2 = s2 - s1^2/n loses nothing worth mentioning in double when the shift is a sample of
// the data. Chunks then merge in order with Chan's formula. Neither step depends on how
// chunks are spread over threads.

// A chunk's mean and M2 around its first row, summed in float64 exactly as before this loop had
// an AVX2 version (same operations, same order, so the same bits). Summing the shifted values in
// float32 blocks instead was measured: 2.4x faster, but the model-level training check
// (tests/test_cli.py, resnet18 at batch 2, where late-stage BN sees 2 values per channel) then
// erred 3.6x more than eager PyTorch, so the statistics stay float64.
//
// s1[c] += d and s2[c] += d * d, d = z[r, c] - shift[c], over rows [0, nrows) of z, in row order.
template <typename scalar_t>
FUSED_RESNET_ALWAYS_INLINE void m2_rows(const scalar_t* z, int64_t nrows, int64_t k, const double* shift_p,
                                        double* s1_p, double* s2_p) {
  const double* __restrict shift = shift_p;
  double* __restrict s1 = s1_p;
  double* __restrict s2 = s2_p;
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* __restrict row = z + r * k;
    FUSED_RESNET_IVDEP
    for (int64_t c = 0; c < k; ++c) {
      const double d = static_cast<double>(row[c]) - shift[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

template <typename scalar_t>
FUSED_RESNET_TARGET_AVX2 void m2_rows_avx2(const scalar_t* z, int64_t nrows, int64_t k, const double* shift,
                                           double* s1, double* s2) {
  m2_rows<scalar_t>(z, nrows, k, shift, s1, s2);
}

template <typename scalar_t>
void m2_rows_base(const scalar_t* z, int64_t nrows, int64_t k, const double* shift, double* s1, double* s2) {
  m2_rows<scalar_t>(z, nrows, k, shift, s1, s2);
}

template <typename scalar_t>
void mean_m2_impl(const scalar_t* z, int64_t m, int64_t k, double* mean, double* m2) {
  const int64_t nchunks = (m + kChunkRows - 1) / kChunkRows;
  std::vector<double> part(static_cast<size_t>(2 * nchunks * k));  // [chunk][mean|M2][channel]
  const bool avx2 = cpu_has_avx2();
  using body_t = std::conditional_t<kStagedRows<scalar_t>, float, scalar_t>;  // float16: staged
  const auto rows = avx2 ? &m2_rows_avx2<body_t> : &m2_rows_base<body_t>;
  at::parallel_for(0, nchunks, chunk_grain(k), [&](int64_t c0, int64_t c1) {
    std::vector<double> buf(static_cast<size_t>(3 * k));
    double* shift = buf.data();
    double* s1 = shift + k;
    double* s2 = s1 + k;
    StageScratch scratch;
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t r0 = ch * kChunkRows, r1 = std::min(m, (ch + 1) * kChunkRows);
      std::fill(s1, s1 + 2 * k, 0.0);
      // The shift is the chunk's first row, whose own deviations (0) are not summed.
      auto first_rows = [&](const body_t* rows_z, int64_t nb) {
        for (int64_t c = 0; c < k; ++c) shift[c] = static_cast<double>(rows_z[c]);
        rows(rows_z + k, nb - 1, k, shift, s1, s2);
      };
      if constexpr (kStagedRows<scalar_t>) {
        bool first = true;
        staged_rows<1, 0>(scratch, {z}, {}, k, r0, r1, stage_rows(k), avx2,
                          [&](const auto& in, const auto&, int64_t nb) {
                            if (first) {
                              first_rows(in[0], nb);
                              first = false;
                            } else {
                              rows(in[0], nb, k, shift, s1, s2);
                            }
                          });
      } else {
        first_rows(z + r0 * k, r1 - r0);
      }
      double* pm = part.data() + 2 * ch * k;
      double* pm2 = pm + k;
      const double cnt = static_cast<double>(r1 - r0);
      for (int64_t c = 0; c < k; ++c) {
        pm[c] = shift[c] + s1[c] / cnt;
        pm2[c] = std::max(s2[c] - s1[c] * s1[c] / cnt, 0.0);
      }
    }
  });
  if (m == 0) {
    // An empty batch: mean 0/0 = NaN and M2 an empty sum = 0, as reference.py gives.
    std::fill(mean, mean + k, std::numeric_limits<double>::quiet_NaN());
    std::fill(m2, m2 + k, 0.0);
    return;
  }
  std::fill(mean, mean + k, 0.0);
  std::fill(m2, m2 + k, 0.0);
  double na = 0.0;
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const double nb = static_cast<double>(std::min(m, (ch + 1) * kChunkRows) - ch * kChunkRows);
    const double n = na + nb;
    const double wb = nb / n, wab = na * nb / n;
    const double* pm = part.data() + 2 * ch * k;
    const double* pm2 = pm + k;
    for (int64_t c = 0; c < k; ++c) {
      const double delta = pm[c] - mean[c];
      mean[c] += delta * wb;
      m2[c] += pm2[c] + delta * delta * wab;
    }
    na = n;
  }
}

// stats (2, K) in the accumulation dtype <- (mean, M2) of z.
at::Tensor channel_stats(const at::Tensor& z) {
  const int64_t k = z.size(1);
  const int64_t m = k == 0 ? 0 : z.numel() / k;
  std::vector<double> mean(k), m2(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv_stats", [&] {
    mean_m2_impl<scalar_t>(z.const_data_ptr<scalar_t>(), m, k, mean.data(), m2.data());
  });
  at::Tensor stats = at::empty({2, k}, z.options().dtype(acc_dtype(z.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "conv_stats", [&] {
    scalar_t* p = stats.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < k; ++c) {
      p[c] = static_cast<scalar_t>(mean[c]);
      p[k + c] = static_cast<scalar_t>(m2[c]);
    }
  });
  return stats;
}

// ---------------------------------------------------------------------------------------------
// Ops

// The checks conv_bn_act and conv_bn_act_residual_ share: x/weight/geometry on the CPU and the
// two (K,) vectors in the accumulation dtype. Returns the output geometry.
ConvGeometry check_conv_bn_act_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                   const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry geo = check_conv(x, weight, stride, padding, dilation, groups);
  check_cpu(x, "x");
  const int64_t k = weight.size(0);
  const auto acc = acc_dtype(x.scalar_type());
  check_vector(scale, "scale", k, acc, x.device());
  check_vector(shift, "shift", k, acc, x.device());
  return geo;
}

at::Tensor conv_bn_act_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                           const at::Tensor& shift, const c10::optional<at::Tensor>& residual,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, bool relu) {
  const ConvGeometry geo = check_conv_bn_act_cpu(x, weight, scale, shift, stride, padding, dilation, groups);
  check_residual(residual, "residual", geo.out_shape, x, "x");

  const at::Tensor xin = channels_last_input(x);
  at::Tensor r;
  if (residual.has_value() && residual->defined()) r = channels_last_input(*residual);
  // float32: one oneDNN call with the epilogue fused as post-ops (onednn.cpp).
  at::Tensor fast = conv_bn_act_onednn(xin, weight, scale, shift, r, stride, padding, dilation, groups, relu);
  if (fast.defined()) {
    TORCH_INTERNAL_ASSERT(fast.sizes() == at::IntArrayRef(geo.out_shape), "oneDNN convolution returned shape ",
                          fast.sizes(), ", expected ", at::IntArrayRef(geo.out_shape));
    return fast;
  }
  at::Tensor y = convolve(xin, weight, geo, stride, padding, dilation, groups);
  // y is a fresh buffer, so the epilogue overwrites it in place.
  affine_add_act(y, y, scale, shift, r, at::Tensor(), at::Tensor(), relu);
  return y;
}

// conv_bn_act into residual's memory. float32 with a channels_last-contiguous residual: one
// oneDNN convolution accumulating into it ("sum" post-op, no output buffer); otherwise (other
// dtypes, another layout, oneDNN off or refusing) the result is computed as conv_bn_act
// computes it and copied in -- the same values, one more pass.
void conv_bn_act_residual_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& residual, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  const ConvGeometry geo = check_conv_bn_act_cpu(x, weight, scale, shift, stride, padding, dilation, groups);
  check_residual_inplace(residual, geo.out_shape, x, weight, scale, shift);
  mark_modified(residual);  // before writing: throws for an inference tensor outside inference mode
  if (residual.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    const at::Tensor done = conv_bn_act_onednn(channels_last_input(x), weight, scale, shift, residual, stride,
                                               padding, dilation, groups, relu, /*into_residual=*/true);
    if (done.defined()) return;
  }
  residual.copy_(conv_bn_act_cpu(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu));
}

std::tuple<at::Tensor, at::Tensor> conv_stats_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& in_scale,
    const c10::optional<at::Tensor>& in_shift, bool in_relu, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry geo = check_conv(x, weight, stride, padding, dilation, groups);
  check_cpu(x, "x");
  const int64_t c = x.size(1);
  const auto acc = acc_dtype(x.scalar_type());
  check_vector(in_scale, "in_scale", c, acc, x.device());
  check_vector(in_shift, "in_shift", c, acc, x.device());

  const bool has_scale = in_scale.has_value() && in_scale->defined();
  const bool has_shift = in_shift.has_value() && in_shift->defined();
  const at::Tensor xin = (has_scale || has_shift || in_relu)
                             ? prologue(x, has_scale ? in_scale : c10::nullopt,
                                        has_shift ? in_shift : c10::nullopt, in_relu)
                             : channels_last_input(x);
  at::Tensor z = convolve(xin, weight, geo, stride, padding, dilation, groups);
  return {z, channel_stats(z)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("conv_bn_act", &conv_bn_act_cpu);
  m.impl("conv_bn_act_residual_", &conv_bn_act_residual_cpu);
  m.impl("conv_stats", &conv_stats_cpu);
}

}  // namespace cpu
}  // namespace fused_resnet
