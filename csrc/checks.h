// Argument validation shared by the CPU and CUDA entry points. Every message names
// the argument and what was expected, so a bad call from Python reads as a
// RuntimeError the user can act on. Header-only; include after ATen.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>
#include <string>

namespace fused_resnet {

// float64 activations accumulate in float64; every other dtype in float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Marks a tensor the caller wrote through its data pointer as modified in place: bumps its
// version counter, as every in-place ATen op does. Code that caches on `_version` (the modules'
// folded-BN cache, autograd's saved-tensor checks) depends on it; our mutating ops are not routed
// through an ADInplaceOrView kernel that would do it for them. Throws, as ATen does, for an
// inference tensor outside inference mode.
inline void mark_modified(const at::Tensor& t) {
  if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
}

inline void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.layout() == at::kStrided, name, ": expected a strided (dense) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D tensor (N, C, H, W), got ", t.dim(),
              "-D with shape ", t.sizes());
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, name,
              ": expected float32, float64, float16 or bfloat16, got ", dt);
}

// `t` must live on the same device and have the same dtype as `ref`.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (same as ",
              ref_name, "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(),
              " (same as ", ref_name, "), got ", t.scalar_type());
}

// A per-channel vector: 1-D, `k` elements, accumulation dtype, on `device`.
inline void check_vector(const at::Tensor& v, const char* name, int64_t k, at::ScalarType dtype,
                         const at::Device& device) {
  TORCH_CHECK(v.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(v.layout() == at::kStrided, name, ": expected a strided (dense) tensor");
  TORCH_CHECK(v.device() == device, name, ": expected device ", device, ", got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == k, name, ": expected shape (", k, ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == dtype, name, ": expected dtype ", dtype,
              " (per-channel vectors are float32, float64 for float64 activations), got ",
              v.scalar_type());
}

// Same, for an optional vector that is only checked when present.
inline void check_vector(const c10::optional<at::Tensor>& v, const char* name, int64_t k,
                         at::ScalarType dtype, const at::Device& device) {
  if (v.has_value() && v->defined()) check_vector(*v, name, k, dtype, device);
}

// bn_finalize_backward's arguments (device-independent part; the caller checks scale's
// device). Returns K.
inline int64_t check_bn_finalize_backward(
    const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& grad_shift,
    const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_invstd,
    const c10::optional<at::Tensor>& gamma, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& invstd, int64_t count) {
  TORCH_CHECK(scale.defined() && scale.dim() == 1, "scale: expected a (K,) tensor");
  const int64_t k = scale.size(0);
  const auto acc = scale.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "scale: expected float32 or float64, got ", acc);
  TORCH_CHECK(count >= 1, "count: expected >= 1, got ", count);
  check_vector(mean, "mean", k, acc, scale.device());
  check_vector(invstd, "invstd", k, acc, scale.device());
  check_vector(grad_scale, "grad_scale", k, acc, scale.device());
  check_vector(grad_shift, "grad_shift", k, acc, scale.device());
  check_vector(grad_mean, "grad_mean", k, acc, scale.device());
  check_vector(grad_invstd, "grad_invstd", k, acc, scale.device());
  check_vector(gamma, "gamma", k, acc, scale.device());
  return k;
}

// A (2, k) statistics tensor as produced by conv_stats.
inline void check_stats(const at::Tensor& s, const char* name, int64_t k = -1) {
  TORCH_CHECK(s.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(s.dim() == 2 && s.size(0) == 2 && (k < 0 || s.size(1) == k), name,
              ": expected shape (2, ", (k < 0 ? std::string("K") : std::to_string(k)),
              ") holding (mean, M2) rows, got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, name,
              ": expected float32 or float64, got ", s.scalar_type());
}

struct ConvGeometry {
  std::array<int64_t, 4> out_shape;  // logical (N, K, P, Q)
};

// Validates x/weight and the convolution hyper-parameters; returns the output shape.
inline ConvGeometry check_conv(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_activation(x, "x");
  TORCH_CHECK(w.defined(), "weight: expected a tensor, got None");
  TORCH_CHECK(w.dim() == 4, "weight: expected a 4-D tensor (K, C/groups, R, S), got ", w.dim(),
              "-D with shape ", w.sizes());
  check_like(w, "weight", x, "x");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding, dilation: expected two values each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1, "stride: expected values >= 1, got ", stride);
    TORCH_CHECK(padding[i] >= 0, "padding: expected values >= 0, got ", padding);
    TORCH_CHECK(dilation[i] >= 1, "dilation: expected values >= 1, got ", dilation);
  }
  TORCH_CHECK(groups >= 1, "groups: expected >= 1, got ", groups);
  const int64_t c = x.size(1), k = w.size(0);
  // Zero input channels or a zero-sized kernel: refused (fused_resnet/functional.py says why).
  TORCH_CHECK(c >= 1, "x: expected at least one input channel (C >= 1), got shape ", x.sizes());
  TORCH_CHECK(w.size(2) >= 1 && w.size(3) >= 1, "weight: expected a kernel of at least 1x1, got shape ",
              w.sizes());
  TORCH_CHECK(c % groups == 0, "groups: x has ", c, " channels, not divisible by groups=", groups);
  TORCH_CHECK(k % groups == 0, "groups: weight has ", k, " output channels, not divisible by groups=",
              groups);
  TORCH_CHECK(w.size(1) * groups == c, "weight: expected shape (K, ", c / groups,
              ", R, S) for x with ", c, " channels and groups=", groups, ", got ", w.sizes());
  std::array<int64_t, 4> out{x.size(0), k, 0, 0};
  for (int i = 0; i < 2; ++i) {
    const int64_t in = x.size(2 + i), kernel = w.size(2 + i);
    const int64_t eff = dilation[i] * (kernel - 1) + 1;
    TORCH_CHECK(in + 2 * padding[i] >= eff, "x: spatial size ", x.sizes().slice(2),
                " with padding ", padding, " is smaller than the dilated kernel (", eff, ")");
    out[2 + i] = (in + 2 * padding[i] - eff) / stride[i] + 1;
  }
  return {out};
}

// residual (when present) must match the output in shape, device and dtype.
inline void check_residual(const c10::optional<at::Tensor>& r, const char* name,
                           at::IntArrayRef out_shape, const at::Tensor& ref, const char* ref_name) {
  if (!r.has_value() || !r->defined()) return;
  check_activation(*r, name);
  check_like(*r, name, ref, ref_name);
  TORCH_CHECK(r->sizes() == out_shape, name, ": expected shape ", out_shape, ", got ", r->sizes());
}

// conv_bn_act_residual_'s residual: required, shaped like the output, and written while x and
// weight are read, so it may not share memory with them (nor with itself, e.g. an expanded
// tensor). The op has no autograd: asking it for a gradient is an error, not a silent detach.
inline void check_residual_inplace(const at::Tensor& residual, at::IntArrayRef out_shape,
                                   const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& scale, const at::Tensor& shift) {
  TORCH_CHECK(residual.defined(), "residual: expected a tensor (the output is written into it), got None");
  check_residual(residual, "residual", out_shape, x, "x");
  TORCH_CHECK(at::has_internal_overlap(residual) != at::MemOverlap::Yes,
              "residual: expected a tensor whose elements do not share memory (it is written in place), "
              "got strides ", residual.strides());
  TORCH_CHECK(at::get_overlap_status(residual, x) == at::MemOverlapStatus::No,
              "residual: must not share memory with x (the convolution reads x while residual is written)");
  TORCH_CHECK(at::get_overlap_status(residual, weight) == at::MemOverlapStatus::No,
              "residual: must not share memory with weight");
  const bool wants_grad = x.requires_grad() || weight.requires_grad() || scale.requires_grad() ||
                          shift.requires_grad() || residual.requires_grad();
  TORCH_CHECK(!(at::GradMode::is_enabled() && wants_grad),
              "conv_bn_act_residual_: inference only (no autograd); an input requires grad with grad mode "
              "on -- use conv_bn_act, or run under torch.no_grad()");
}

}  // namespace fused_resnet
