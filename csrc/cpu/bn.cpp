// CPU kernels of the BatchNorm-side ops: bn_add_act (and the epilogue conv_bn_act shares
// with it), bn_add_act_backward, stats_backward, bn_finalize, bn_update_running_stats.
// Meaning of each op: fused_resnet/reference.py; schemas: csrc/ops.cpp.
//
// Activations are processed as (M, K) row-major matrices (see cpu_kernels.h): parallel over
// pixel rows, inner loop over channels, so the per-channel vectors stay in L1 and the inner
// loop vectorizes. Options cost no extra instantiations: relu is a loop-invariant select,
// a residual picks one of two loops, and an absent res_scale / res_shift becomes an identity
// vector (x * 1 + 0 == x exactly), so each kernel is instantiated once per dtype, except float16:
// its rows run the float row body on float32 staging blocks (lowp.h), bitwise as a direct loop
// would.
#include "cpu_kernels.h"
#include "lowp.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace fused_resnet {
namespace cpu {

at::Tensor canonical_channels_last(const at::Tensor& t) {
  const auto want = c10::get_channels_last_strides_2d(t.sizes());
  if (t.strides() == at::IntArrayRef(want)) return t;
  auto opts = t.options().memory_format(at::MemoryFormat::ChannelsLast);
  if (t.numel() == 0) return at::empty(t.sizes(), opts);
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    // Same addresses, only the strides of size-1 dims differ: a new header over the storage.
    return at::empty({0}, t.options()).set_(t.storage(), t.storage_offset(), t.sizes(), want);
  }
  return at::empty(t.sizes(), opts).copy_(t);
}

namespace {

// ---------------------------------------------------------------------------------------------
// The BN epilogue act(z * scale + shift (+ residual * res_scale + res_shift)): its operands and
// its pre-activation, shared by the forward (affine_rows) and the backward (bn_backward_rows), so
// the backward's ReLU mask is computed from exactly the forward's value.

// The four (K,) vectors in the accumulation type, contiguous; res_scale / res_shift absent
// (undefined) read as 1 / 0. Owns whatever copies that takes, so keep it alive while the
// pointers are used.
template <typename acc_t>
struct BnVectors {
  BnVectors(const at::Tensor& scale_t, const at::Tensor& shift_t, const at::Tensor& res_scale_t,
            const at::Tensor& res_shift_t, int64_t k)
      : s_(scale_t.contiguous()), b_(shift_t.contiguous()) {
    scale = s_.const_data_ptr<acc_t>();
    shift = b_.const_data_ptr<acc_t>();
    res_scale = or_fill(res_scale_t, rs_, ones_, k, acc_t(1));
    res_shift = or_fill(res_shift_t, rb_, zeros_, k, acc_t(0));
  }
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* res_scale;
  const acc_t* res_shift;

 private:
  static const acc_t* or_fill(const at::Tensor& v, at::Tensor& keep, std::vector<acc_t>& storage, int64_t k,
                              acc_t fill) {
    if (v.defined()) {
      keep = v.contiguous();
      return keep.const_data_ptr<acc_t>();
    }
    storage.assign(k, fill);
    return storage.data();
  }
  at::Tensor s_, b_, rs_, rb_;
  std::vector<acc_t> ones_, zeros_;
};

// Rows of z (and residual) are k channels_last-contiguous values.
template <typename scalar_t>
struct BnOperands {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* z;
  const scalar_t* res;  // nullptr: no residual
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* res_scale;
  const acc_t* res_shift;
  int64_t k;
  bool relu;
};

template <typename scalar_t>
BnOperands<scalar_t> bn_operands(const scalar_t* z, const scalar_t* res,
                                 const BnVectors<at::opmath_type<scalar_t>>& v, int64_t k, bool relu) {
  return {z, res, v.scale, v.shift, v.res_scale, v.res_shift, k, relu};
}

// The same operands over float32 staging blocks z, res (lowp.h) of float16 rows.
template <typename scalar_t>
BnOperands<float> staged_operands(const BnOperands<scalar_t>& in, const float* z, const float* res) {
  static_assert(std::is_same_v<at::opmath_type<scalar_t>, float>);
  return {z, res, in.scale, in.shift, in.res_scale, in.res_shift, in.k, in.relu};
}

// The pre-activation of channel c, with the reference's association: (z*s + b) + (r*rs + rb).
template <typename acc_t>
FUSED_RESNET_ALWAYS_INLINE acc_t bn_pre(acc_t z, const acc_t* __restrict scale, const acc_t* __restrict shift,
                                        int64_t c) {
  return z * scale[c] + shift[c];
}
template <typename acc_t>
FUSED_RESNET_ALWAYS_INLINE acc_t bn_pre(acc_t z, acc_t r, const acc_t* __restrict scale,
                                        const acc_t* __restrict shift, const acc_t* __restrict res_scale,
                                        const acc_t* __restrict res_shift, int64_t c) {
  return z * scale[c] + shift[c] + (r * res_scale[c] + res_shift[c]);
}

// ---------------------------------------------------------------------------------------------
// bn_add_act / conv_bn_act epilogue

template <typename scalar_t>
struct AffineArgs {
  BnOperands<scalar_t> in;
  scalar_t* out;
};

// Rows [r0, r1) of out = act(z * scale + shift (+ residual * res_scale + res_shift)).
template <typename scalar_t>
FUSED_RESNET_ALWAYS_INLINE void affine_rows(const AffineArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t zero(0);
  const BnOperands<scalar_t>& in = a.in;
  const int64_t k = in.k;
  const bool relu = in.relu;
  const acc_t* scale = in.scale;
  const acc_t* shift = in.shift;
  const acc_t* res_scale = in.res_scale;
  const acc_t* res_shift = in.res_shift;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* zr = in.z + r * k;
    scalar_t* o = a.out + r * k;  // may equal zr: each element is read before it is written
    if (in.res != nullptr) {
      const scalar_t* rr = in.res + r * k;
      FUSED_RESNET_IVDEP
      for (int64_t c = 0; c < k; ++c) {
        const acc_t v = bn_pre(static_cast<acc_t>(zr[c]), static_cast<acc_t>(rr[c]), scale, shift, res_scale,
                               res_shift, c);
        // std::max(v, 0) keeps NaN, as torch.relu does; the invariant select vectorizes.
        o[c] = round_to<scalar_t>(relu ? std::max(v, zero) : v);
      }
    } else {
      FUSED_RESNET_IVDEP
      for (int64_t c = 0; c < k; ++c) {
        const acc_t v = bn_pre(static_cast<acc_t>(zr[c]), scale, shift, c);
        o[c] = round_to<scalar_t>(relu ? std::max(v, zero) : v);
      }
    }
  }
}

template <typename scalar_t>
FUSED_RESNET_TARGET_AVX2 void affine_rows_avx2(const AffineArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  affine_rows<scalar_t>(a, r0, r1);
}

template <typename scalar_t>
void affine_rows_base(const AffineArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  affine_rows<scalar_t>(a, r0, r1);
}

template <typename scalar_t>
void affine_add_act_impl(const AffineArgs<scalar_t>& a, int64_t m) {
  const bool avx2 = cpu_has_avx2();
  const int64_t k = a.in.k;
  if constexpr (kStagedRows<scalar_t>) {
    const auto rows = avx2 ? &affine_rows_avx2<float> : &affine_rows_base<float>;
    at::parallel_for(0, m, row_grain(k), [&](int64_t r0, int64_t r1) {
      StageScratch scratch;
      staged_rows<2, 1>(scratch, {a.in.z, a.in.res}, {a.out}, k, r0, r1, stage_rows(k), avx2,
                        [&](const auto& in, const auto& out, int64_t nb) {
                          rows({staged_operands(a.in, in[0], in[1]), out[0]}, 0, nb);
                        });
    });
  } else {
    const auto rows = avx2 ? &affine_rows_avx2<scalar_t> : &affine_rows_base<scalar_t>;
    at::parallel_for(0, m, row_grain(k), [&](int64_t r0, int64_t r1) { rows(a, r0, r1); });
  }
}

}  // namespace

void affine_add_act(const at::Tensor& out, const at::Tensor& z, const at::Tensor& scale,
                    const at::Tensor& shift, const at::Tensor& residual,
                    const at::Tensor& res_scale, const at::Tensor& res_shift, bool relu) {
  const int64_t k = z.size(1);
  const int64_t m = k == 0 ? 0 : z.numel() / k;
  if (m == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "affine_add_act", [&] {
    const BnVectors<at::opmath_type<scalar_t>> v(scale, shift, res_scale, res_shift, k);
    const AffineArgs<scalar_t> a{
        bn_operands(z.const_data_ptr<scalar_t>(),
                    residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr, v, k, relu),
        out.mutable_data_ptr<scalar_t>()};
    affine_add_act_impl<scalar_t>(a, m);
  });
}

namespace {

at::Tensor undefined_if_none(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// Common validation of (z, scale, shift, residual, res_scale, res_shift).
void check_bn_add_act_args(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                           const c10::optional<at::Tensor>& residual,
                           const c10::optional<at::Tensor>& res_scale,
                           const c10::optional<at::Tensor>& res_shift) {
  check_activation(z, "z");
  check_cpu(z, "z");
  const int64_t k = z.size(1);
  const auto acc = acc_dtype(z.scalar_type());
  check_vector(scale, "scale", k, acc, z.device());
  check_vector(shift, "shift", k, acc, z.device());
  check_residual(residual, "residual", z.sizes(), z, "z");
  // Validated even without a residual (where reference.py ignores them), so a wrong
  // vector is reported rather than silently accepted.
  check_vector(res_scale, "res_scale", k, acc, z.device());
  check_vector(res_shift, "res_shift", k, acc, z.device());
}

at::Tensor bn_add_act_cpu(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                          const c10::optional<at::Tensor>& residual,
                          const c10::optional<at::Tensor>& res_scale,
                          const c10::optional<at::Tensor>& res_shift, bool relu) {
  check_bn_add_act_args(z, scale, shift, residual, res_scale, res_shift);
  const at::Tensor zc = channels_last_input(z);
  at::Tensor r = undefined_if_none(residual);
  if (r.defined()) r = channels_last_input(r);
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::ChannelsLast));
  // Without a residual, res_scale/res_shift have nothing to apply to (as in reference.py).
  affine_add_act(out, zc, scale, shift, r, r.defined() ? undefined_if_none(res_scale) : at::Tensor(),
                 r.defined() ? undefined_if_none(res_shift) : at::Tensor(), relu);
  return out;
}

// ---------------------------------------------------------------------------------------------
// bn_add_act_backward

// The per-channel sums sum(g * z), sum(g), sum(g * residual) stay float64 with exact
// products (a float32 product times a float32 value is exact in float64): the autograd
// formula subtracts mean * sum(g) from sum(g * z) (bn_finalize's backward), a cancellation
// that turns float32 rounding of these sums into a large error whenever |mean| >> std (seen
// at batch 2 in the model-level training benchmark). What made the old loop slow was its
// shape, not float64: one loop over channels with three float64 accumulators, two stores and
// the ReLU select did not vectorize. Here each row loop is split in two -- the elementwise
// outputs in the activation's accumulation type, then the sums over a block of kSumRows rows
// -- so both parts vectorize; the sums are kept in float64 block partials added into the
// chunk partials in a fixed order (thread-count independent).
constexpr int64_t kSumRows = 16;

template <typename scalar_t>
struct BnBackwardArgs {
  BnOperands<scalar_t> in;
  const scalar_t* go;
  scalar_t* grad_z;
  scalar_t* grad_res;  // nullptr: no residual
};

// bfloat16 writes grad_res in a loop of its own: with both roundings in one loop GCC does not
// vectorize it ("control flow in loop"; it ran 7x slower than float32). float32's one loop
// vectorizes and is faster than two (measured ~30 %).
template <typename scalar_t>
inline constexpr bool kSplitRes = std::is_same_v<scalar_t, c10::BFloat16>;

// Rows [r0, r1) of one chunk: writes grad_z (and grad_res), adds the chunk's sums into
// p_gz/p_g/p_gr (float64, zeroed by the caller). f: 3*k float64 block sums; gb: k values of
// acc_t holding the current row's masked gradient g.
template <typename scalar_t, bool kRes>
FUSED_RESNET_ALWAYS_INLINE void bn_backward_rows(const BnBackwardArgs<scalar_t>& a, int64_t r0, int64_t r1,
                                                 double* f, at::opmath_type<scalar_t>* gb,
                                                 double* __restrict p_gz, double* __restrict p_g,
                                                 double* __restrict p_gr) {
  using acc_t = at::opmath_type<scalar_t>;
  const BnOperands<scalar_t>& in = a.in;
  const int64_t k = in.k;
  const acc_t zero(0);
  const acc_t* __restrict scale = in.scale;
  const acc_t* __restrict shift = in.shift;
  const acc_t* __restrict res_scale = in.res_scale;
  const acc_t* __restrict res_shift = in.res_shift;
  const bool relu = in.relu;
  acc_t* __restrict g_row = gb;
  double* __restrict f_gz = f;
  double* __restrict f_g = f + k;
  double* __restrict f_gr = f + 2 * k;
  for (int64_t b0 = r0; b0 < r1; b0 += kSumRows) {
    const int64_t b1 = std::min(r1, b0 + kSumRows);
    std::fill(f, f + 3 * k, 0.0);
    for (int64_t r = b0; r < b1; ++r) {
      const int64_t off = r * k;
      const scalar_t* __restrict gor = a.go + off;
      const scalar_t* __restrict zr = in.z + off;
      scalar_t* __restrict gzr = a.grad_z + off;
      // Elementwise part, in acc_t.
      if constexpr (kRes) {
        const scalar_t* __restrict rr = in.res + off;
        scalar_t* __restrict grr = a.grad_res + off;
        FUSED_RESNET_IVDEP
        for (int64_t c = 0; c < k; ++c) {
          const acc_t zv = static_cast<acc_t>(zr[c]);
          const acc_t rv = static_cast<acc_t>(rr[c]);
          const acc_t pre = bn_pre(zv, rv, scale, shift, res_scale, res_shift, c);
          const acc_t gv = static_cast<acc_t>(gor[c]);  // loaded unconditionally: if-convertible
          const acc_t g = (!relu || pre > zero) ? gv : zero;
          g_row[c] = g;
          gzr[c] = round_to<scalar_t>(g * scale[c]);
          if constexpr (!kSplitRes<scalar_t>) grr[c] = round_to<scalar_t>(g * res_scale[c]);  // absent: g * 1
        }
        if constexpr (kSplitRes<scalar_t>) {
          FUSED_RESNET_IVDEP
          for (int64_t c = 0; c < k; ++c) grr[c] = round_to<scalar_t>(g_row[c] * res_scale[c]);
        }
      } else {
        FUSED_RESNET_IVDEP
        for (int64_t c = 0; c < k; ++c) {
          const acc_t zv = static_cast<acc_t>(zr[c]);
          const acc_t pre = bn_pre(zv, scale, shift, c);
          const acc_t gv = static_cast<acc_t>(gor[c]);
          const acc_t g = (!relu || pre > zero) ? gv : zero;
          g_row[c] = g;
          gzr[c] = round_to<scalar_t>(g * scale[c]);
        }
      }
      // Sums, in float64 with exact products.
      FUSED_RESNET_IVDEP
      for (int64_t c = 0; c < k; ++c) {
        const double g = static_cast<double>(g_row[c]);
        f_gz[c] += g * static_cast<double>(static_cast<acc_t>(zr[c]));
        f_g[c] += g;
      }
      if constexpr (kRes) {
        const scalar_t* __restrict rr = in.res + off;
        FUSED_RESNET_IVDEP
        for (int64_t c = 0; c < k; ++c) {
          f_gr[c] += static_cast<double>(g_row[c]) * static_cast<double>(static_cast<acc_t>(rr[c]));
        }
      }
    }
    FUSED_RESNET_IVDEP
    for (int64_t c = 0; c < k; ++c) {
      p_gz[c] += f_gz[c];
      p_g[c] += f_g[c];
    }
    if constexpr (kRes) {
      FUSED_RESNET_IVDEP
      for (int64_t c = 0; c < k; ++c) p_gr[c] += f_gr[c];
    }
  }
}

template <typename scalar_t, bool kRes>
FUSED_RESNET_TARGET_AVX2 void bn_backward_rows_avx2(const BnBackwardArgs<scalar_t>& a, int64_t r0, int64_t r1,
                                                     double* f, at::opmath_type<scalar_t>* gb, double* p_gz,
                                                     double* p_g, double* p_gr) {
  bn_backward_rows<scalar_t, kRes>(a, r0, r1, f, gb, p_gz, p_g, p_gr);
}

template <typename scalar_t, bool kRes>
void bn_backward_rows_base(const BnBackwardArgs<scalar_t>& a, int64_t r0, int64_t r1, double* f,
                           at::opmath_type<scalar_t>* gb, double* p_gz, double* p_g, double* p_gr) {
  bn_backward_rows<scalar_t, kRes>(a, r0, r1, f, gb, p_gz, p_g, p_gr);
}

// The row body for scalar_t rows: float for float16, which runs staged (lowp.h).
template <typename scalar_t>
auto bn_backward_rows_for(bool has_res, bool avx2) {
  using body_t = std::conditional_t<kStagedRows<scalar_t>, float, scalar_t>;
  return has_res ? (avx2 ? &bn_backward_rows_avx2<body_t, true> : &bn_backward_rows_base<body_t, true>)
                 : (avx2 ? &bn_backward_rows_avx2<body_t, false> : &bn_backward_rows_base<body_t, false>);
}

template <typename scalar_t>
void bn_add_act_backward_impl(const BnBackwardArgs<scalar_t>& a, int64_t m, double* sum_gz, double* sum_g,
                              double* sum_gr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = a.in.k;
  const bool has_res = a.in.res != nullptr;
  const bool avx2 = cpu_has_avx2();
  const int64_t nchunks = (m + kChunkRows - 1) / kChunkRows;
  const int64_t nsums = has_res ? 3 : 2;
  const auto rows = bn_backward_rows_for<scalar_t>(has_res, avx2);
  // Per-chunk partial sums, [chunk][sum][channel]; merged below in chunk order.
  std::vector<double> part(static_cast<size_t>(nchunks * nsums * k), 0.0);
  at::parallel_for(0, nchunks, chunk_grain(k), [&](int64_t c0, int64_t c1) {
    std::vector<double> f(static_cast<size_t>(3 * k));
    std::vector<acc_t> gb(static_cast<size_t>(k));
    StageScratch scratch;
    for (int64_t ch = c0; ch < c1; ++ch) {
      double* p_gz = part.data() + ch * nsums * k;
      double* p_g = p_gz + k;
      double* p_gr = has_res ? p_g + k : nullptr;
      const int64_t r0 = ch * kChunkRows, r1 = std::min(m, (ch + 1) * kChunkRows);
      if constexpr (kStagedRows<scalar_t>) {
        // Blocks of whole kSumRows blocks from the chunk's start: the body sums the same rows in
        // the same float64 blocks as over the whole chunk.
        staged_rows<3, 2>(
            scratch, {a.go, a.in.z, a.in.res}, {a.grad_z, a.grad_res}, k, r0, r1, stage_rows(k, kSumRows), avx2,
            [&](const auto& in, const auto& out, int64_t nb) {
              rows({staged_operands(a.in, in[1], in[2]), in[0], out[0], out[1]}, 0, nb, f.data(), gb.data(), p_gz,
                   p_g, p_gr);
            });
      } else {
        rows(a, r0, r1, f.data(), gb.data(), p_gz, p_g, p_gr);
      }
    }
  });
  std::fill(sum_gz, sum_gz + k, 0.0);
  std::fill(sum_g, sum_g + k, 0.0);
  if (sum_gr != nullptr) std::fill(sum_gr, sum_gr + k, 0.0);
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const double* p = part.data() + ch * nsums * k;
    for (int64_t c = 0; c < k; ++c) {
      sum_gz[c] += p[c];
      sum_g[c] += p[k + c];
    }
    if (sum_gr != nullptr) {
      for (int64_t c = 0; c < k; ++c) sum_gr[c] += p[2 * k + c];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& scale,
    const at::Tensor& shift, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& res_scale, const c10::optional<at::Tensor>& res_shift,
    bool relu) {
  check_bn_add_act_args(z, scale, shift, residual, res_scale, res_shift);
  check_activation(grad_out, "grad_out");
  check_like(grad_out, "grad_out", z, "z");
  TORCH_CHECK(grad_out.sizes() == z.sizes(), "grad_out: expected shape ", z.sizes(),
              " (same as z), got ", grad_out.sizes());

  const auto cl = at::MemoryFormat::ChannelsLast;
  const int64_t k = z.size(1);
  const int64_t m = k == 0 ? 0 : z.numel() / k;
  const at::Tensor zc = channels_last_input(z);
  const at::Tensor goc = channels_last_input(grad_out);
  at::Tensor r = undefined_if_none(residual);
  const bool has_res = r.defined();
  const bool has_rs = has_res && res_scale.has_value() && res_scale->defined();
  if (has_res) r = channels_last_input(r);

  const auto vec_opts = scale.options();
  at::Tensor grad_z = at::empty(z.sizes(), z.options().memory_format(cl));
  at::Tensor grad_scale = at::empty({k}, vec_opts);
  at::Tensor grad_shift = at::empty({k}, vec_opts);
  at::Tensor grad_res = has_res ? at::empty(z.sizes(), z.options().memory_format(cl))
                                : at::empty({0}, z.options());
  std::vector<double> sum_gz(k), sum_g(k), sum_gr(has_res ? k : 0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_add_act_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BnVectors<acc_t> v(scale, shift, has_res ? undefined_if_none(res_scale) : at::Tensor(),
                             has_res ? undefined_if_none(res_shift) : at::Tensor(), k);
    const BnBackwardArgs<scalar_t> args{
        bn_operands(zc.const_data_ptr<scalar_t>(), has_res ? r.const_data_ptr<scalar_t>() : nullptr, v, k, relu),
        goc.const_data_ptr<scalar_t>(), grad_z.mutable_data_ptr<scalar_t>(),
        has_res ? grad_res.mutable_data_ptr<scalar_t>() : nullptr};
    bn_add_act_backward_impl<scalar_t>(args, m, sum_gz.data(), sum_g.data(), has_res ? sum_gr.data() : nullptr);
    acc_t* gs = grad_scale.mutable_data_ptr<acc_t>();
    acc_t* gb = grad_shift.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < k; ++c) {
      gs[c] = static_cast<acc_t>(sum_gz[c]);
      gb[c] = static_cast<acc_t>(sum_g[c]);
    }
  });

  at::Tensor grad_res_scale;
  if (has_rs) {
    grad_res_scale = at::empty({k}, vec_opts);
    AT_DISPATCH_FLOATING_TYPES(grad_res_scale.scalar_type(), "bn_add_act_backward", [&] {
      scalar_t* p = grad_res_scale.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < k; ++c) p[c] = static_cast<scalar_t>(sum_gr[c]);
    });
  } else {
    grad_res_scale = at::empty({0}, vec_opts);
  }
  return {grad_z, grad_scale, grad_shift, grad_res, grad_res_scale};
}

// ---------------------------------------------------------------------------------------------
// stats_backward

template <typename scalar_t>
struct StatsBackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* z;
  const scalar_t* grad_z;
  scalar_t* out;
  const acc_t* a;     // grad_stats[0] / count
  const acc_t* b;     // 2 * grad_stats[1]
  const acc_t* mean;  // stats[0]
  int64_t k;
};

// Rows [r0, r1) of out = grad_z + a + b * (z - mean).
template <typename scalar_t>
FUSED_RESNET_ALWAYS_INLINE void stats_backward_rows(const StatsBackwardArgs<scalar_t>& p, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.k;
  const acc_t* pa = p.a;
  const acc_t* pb = p.b;
  const acc_t* mean = p.mean;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * k;
    const scalar_t* zr = p.z + off;
    const scalar_t* gr = p.grad_z + off;
    scalar_t* o = p.out + off;
    FUSED_RESNET_IVDEP
    for (int64_t c = 0; c < k; ++c) {
      const acc_t v = static_cast<acc_t>(gr[c]) + pa[c] + pb[c] * (static_cast<acc_t>(zr[c]) - mean[c]);
      o[c] = round_to<scalar_t>(v);
    }
  }
}

template <typename scalar_t>
FUSED_RESNET_TARGET_AVX2 void stats_backward_rows_avx2(const StatsBackwardArgs<scalar_t>& p, int64_t r0,
                                                       int64_t r1) {
  stats_backward_rows<scalar_t>(p, r0, r1);
}

template <typename scalar_t>
void stats_backward_rows_base(const StatsBackwardArgs<scalar_t>& p, int64_t r0, int64_t r1) {
  stats_backward_rows<scalar_t>(p, r0, r1);
}

template <typename scalar_t>
void stats_backward_impl(const StatsBackwardArgs<scalar_t>& p, int64_t m) {
  const bool avx2 = cpu_has_avx2();
  const int64_t k = p.k;
  if constexpr (kStagedRows<scalar_t>) {
    const auto rows = avx2 ? &stats_backward_rows_avx2<float> : &stats_backward_rows_base<float>;
    at::parallel_for(0, m, row_grain(k), [&](int64_t r0, int64_t r1) {
      StageScratch scratch;
      staged_rows<2, 1>(scratch, {p.z, p.grad_z}, {p.out}, k, r0, r1, stage_rows(k), avx2,
                        [&](const auto& in, const auto& out, int64_t nb) {
                          rows({in[0], in[1], out[0], p.a, p.b, p.mean, k}, 0, nb);
                        });
    });
  } else {
    const auto rows = avx2 ? &stats_backward_rows_avx2<scalar_t> : &stats_backward_rows_base<scalar_t>;
    at::parallel_for(0, m, row_grain(k), [&](int64_t r0, int64_t r1) { rows(p, r0, r1); });
  }
}

at::Tensor stats_backward_cpu(const at::Tensor& grad_z, const at::Tensor& grad_stats,
                              const at::Tensor& z, const at::Tensor& stats, int64_t count) {
  check_activation(z, "z");
  check_cpu(z, "z");
  check_activation(grad_z, "grad_z");
  check_like(grad_z, "grad_z", z, "z");
  TORCH_CHECK(grad_z.sizes() == z.sizes(), "grad_z: expected shape ", z.sizes(),
              " (same as z), got ", grad_z.sizes());
  const int64_t k = z.size(1);
  check_stats(stats, "stats", k);
  const auto acc = acc_dtype(z.scalar_type());
  TORCH_CHECK(stats.scalar_type() == acc, "stats: expected dtype ", acc,
              " (the accumulation dtype of z's ", z.scalar_type(), "), got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == z.device(), "stats: expected device ", z.device(),
              " (same as z), got ", stats.device());
  check_stats(grad_stats, "grad_stats", k);
  check_like(grad_stats, "grad_stats", stats, "stats");
  TORCH_CHECK(count >= 1 || z.numel() == 0,
              "count: expected >= 1 (values per channel in stats), got ", count);

  const at::Tensor zc = channels_last_input(z);
  const at::Tensor gzc = channels_last_input(grad_z);
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t m = k == 0 ? 0 : z.numel() / k;
  if (m == 0) return out;
  const at::Tensor st = stats.contiguous(), gst = grad_stats.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "stats_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* mean = st.const_data_ptr<acc_t>();
    const acc_t* gs = gst.const_data_ptr<acc_t>();
    // Per-channel terms as reference.py forms them: grad_stats[0] / count, 2 * grad_stats[1].
    std::vector<acc_t> a(k), b(k);
    for (int64_t c = 0; c < k; ++c) {
      a[c] = gs[c] / static_cast<acc_t>(count);
      b[c] = acc_t(2) * gs[k + c];
    }
    const StatsBackwardArgs<scalar_t> args{zc.const_data_ptr<scalar_t>(), gzc.const_data_ptr<scalar_t>(),
                                           out.mutable_data_ptr<scalar_t>(), a.data(), b.data(), mean, k};
    stats_backward_impl<scalar_t>(args, m);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// bn_finalize / bn_update_running_stats: per-channel, K elements, no parallelism needed.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_cpu(
    const at::Tensor& stats, int64_t count, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, double eps) {
  check_stats(stats, "stats");
  check_cpu(stats, "stats");
  const int64_t k = stats.size(1);
  TORCH_CHECK(count >= 1, "count: expected >= 1 (values per channel in stats), got ", count);
  check_vector(gamma, "gamma", k, stats.scalar_type(), stats.device());
  check_vector(beta, "beta", k, stats.scalar_type(), stats.device());

  const at::Tensor st = stats.contiguous();
  const at::Tensor g = undefined_if_none(gamma), b = undefined_if_none(beta);
  const at::Tensor gc = g.defined() ? g.contiguous() : g, bc = b.defined() ? b.contiguous() : b;
  at::Tensor scale = at::empty({k}, stats.options());
  at::Tensor shift = at::empty({k}, stats.options());
  at::Tensor save_mean = at::empty({k}, stats.options());
  at::Tensor save_invstd = at::empty({k}, stats.options());
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "bn_finalize", [&] {
    // In stats' dtype, operation by operation as reference.py (and BatchNorm) compute it.
    const scalar_t* mean = st.const_data_ptr<scalar_t>();
    const scalar_t* m2 = mean + k;
    const scalar_t* gp = gc.defined() ? gc.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = scale.mutable_data_ptr<scalar_t>();
    scalar_t* hp = shift.mutable_data_ptr<scalar_t>();
    scalar_t* mp = save_mean.mutable_data_ptr<scalar_t>();
    scalar_t* ip = save_invstd.mutable_data_ptr<scalar_t>();
    const scalar_t n = static_cast<scalar_t>(count);
    const scalar_t e = static_cast<scalar_t>(eps);
    for (int64_t c = 0; c < k; ++c) {
      const scalar_t invstd = scalar_t(1) / std::sqrt(m2[c] / n + e);
      const scalar_t s = gp != nullptr ? gp[c] * invstd : invstd;
      mp[c] = mean[c];
      ip[c] = invstd;
      sp[c] = s;
      hp[c] = bp != nullptr ? bp[c] - mean[c] * s : -mean[c] * s;
    }
  });
  return {scale, shift, save_mean, save_invstd};
}

// With t = g_scale - g_shift * mean: grad_gamma = t * invstd; d mean = -g_shift * scale + g_mean;
// d M2 = (t * gamma + g_invstd) * (-invstd^3 / (2 * count)). Computed in double, rounded once.
std::tuple<at::Tensor, at::Tensor> bn_finalize_backward_cpu(
    const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& grad_shift,
    const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_invstd,
    const c10::optional<at::Tensor>& gamma, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& invstd, int64_t count) {
  const int64_t k = check_bn_finalize_backward(grad_scale, grad_shift, grad_mean, grad_invstd, gamma, scale, mean,
                                                 invstd, count);
  const auto acc = scale.scalar_type();
  check_cpu(scale, "scale");
  auto dense = [](const c10::optional<at::Tensor>& t) {
    const at::Tensor u = undefined_if_none(t);
    return u.defined() ? u.contiguous() : u;
  };
  const at::Tensor gs = dense(grad_scale), gb = dense(grad_shift), ga = dense(gamma);
  const at::Tensor gm = dense(grad_mean), gi = dense(grad_invstd);
  const at::Tensor sc = scale.contiguous(), mn = mean.contiguous(), is = invstd.contiguous();
  at::Tensor grad_stats = at::empty({2, k}, scale.options());
  at::Tensor grad_gamma = at::empty({k}, scale.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_finalize_backward", [&] {
    const scalar_t* gsp = gs.defined() ? gs.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gbp = gb.defined() ? gb.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gap = ga.defined() ? ga.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gmp = gm.defined() ? gm.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gip = gi.defined() ? gi.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* scp = sc.const_data_ptr<scalar_t>();
    const scalar_t* mp = mn.const_data_ptr<scalar_t>();
    const scalar_t* ip = is.const_data_ptr<scalar_t>();
    scalar_t* dmean = grad_stats.mutable_data_ptr<scalar_t>();
    scalar_t* dm2 = dmean + k;
    scalar_t* dgamma = grad_gamma.mutable_data_ptr<scalar_t>();
    const double half_over_n = 0.5 / static_cast<double>(count);
    for (int64_t c = 0; c < k; ++c) {
      const double g_s = gsp != nullptr ? static_cast<double>(gsp[c]) : 0.0;
      const double g_b = gbp != nullptr ? static_cast<double>(gbp[c]) : 0.0;
      const double inv = static_cast<double>(ip[c]);
      const double t = g_s - g_b * static_cast<double>(mp[c]);
      const double d_inv = t * (gap != nullptr ? static_cast<double>(gap[c]) : 1.0) +
                           (gip != nullptr ? static_cast<double>(gip[c]) : 0.0);
      dgamma[c] = static_cast<scalar_t>(t * inv);
      dmean[c] = static_cast<scalar_t>(-g_b * static_cast<double>(scp[c]) +
                                       (gmp != nullptr ? static_cast<double>(gmp[c]) : 0.0));
      dm2[c] = static_cast<scalar_t>(-d_inv * inv * inv * inv * half_over_n);
    }
  });
  return {grad_stats, grad_gamma};
}

void check_running(const at::Tensor& t, const char* name, int64_t k) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.layout() == at::kStrided, name, ": expected a strided (dense) tensor");
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == k, name, ": expected shape (", k, ",), got ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, name,
              ": expected float32, float64, float16 or bfloat16, got ", dt);
}

// running = running * (1 - factor) + batch * factor, in double, rounded once to running's dtype.
void blend_into(const at::Tensor& running, const double* batch, double factor) {
  const int64_t k = running.size(0), stride = running.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "bn_update_running_stats", [&] {
    scalar_t* p = running.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < k; ++c) {
      const double old = static_cast<double>(p[c * stride]);
      p[c * stride] = static_cast<scalar_t>(old * (1.0 - factor) + factor * batch[c]);
    }
  });
}

void bn_update_running_stats_cpu(const at::Tensor& stats, int64_t count,
                                 const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const c10::optional<at::Tensor>& num_batches_tracked,
                                 c10::optional<double> momentum) {
  // Everything is validated before anything is mutated.
  check_stats(stats, "stats");
  check_cpu(stats, "stats");
  const int64_t k = stats.size(1);
  TORCH_CHECK(count > 1, "count: expected more than 1 value per channel when training (as "
              "nn.BatchNorm2d), got ", count);
  check_running(running_mean, "running_mean", k);
  check_running(running_var, "running_var", k);
  const bool has_nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (has_nbt) {
    const at::Tensor& nbt = *num_batches_tracked;
    check_cpu(nbt, "num_batches_tracked");
    TORCH_CHECK(nbt.scalar_type() == at::kLong, "num_batches_tracked: expected dtype ", at::kLong,
                ", got ", nbt.scalar_type());
    TORCH_CHECK(nbt.numel() == 1, "num_batches_tracked: expected one element, got shape ",
                nbt.sizes());
  }
  TORCH_CHECK(momentum.has_value() || has_nbt,
              "momentum: None (cumulative moving average) needs num_batches_tracked, got None");

  double factor = momentum.has_value() ? *momentum : 0.0;
  if (has_nbt) {
    int64_t* nbt = num_batches_tracked->mutable_data_ptr<int64_t>();
    TORCH_CHECK(momentum.has_value() || *nbt >= 0,
                "num_batches_tracked: expected >= 0 for momentum=None, got ", *nbt);
    *nbt += 1;
    if (!momentum.has_value()) factor = 1.0 / static_cast<double>(*nbt);
  }

  const at::Tensor st = stats.to(at::kDouble).contiguous();
  const double* mean = st.const_data_ptr<double>();
  const double* m2 = mean + k;
  const double denom = static_cast<double>(std::max<int64_t>(count - 1, 1));
  std::vector<double> unbiased(k);
  for (int64_t c = 0; c < k; ++c) unbiased[c] = m2[c] / denom;
  blend_into(running_mean, mean, factor);
  blend_into(running_var, unbiased.data(), factor);
  mark_modified(running_mean);
  mark_modified(running_var);
  if (has_nbt) mark_modified(*num_batches_tracked);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_add_act", &bn_add_act_cpu);
  m.impl("bn_add_act_backward", &bn_add_act_backward_cpu);
  m.impl("stats_backward", &stats_backward_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("bn_finalize_backward", &bn_finalize_backward_cpu);
  m.impl("bn_update_running_stats", &bn_update_running_stats_cpu);
}

}  // namespace cpu
}  // namespace fused_resnet
