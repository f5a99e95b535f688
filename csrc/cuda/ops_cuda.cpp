// CUDA implementations of the fused_resnet ops (schemas: csrc/ops.cpp; meaning:
// fused_resnet/reference.py). Host glue only: validates arguments, lays tensors out as
// NHWC, runs the convolution through ATen (cuDNN) and hands raw pointers to the launchers
// of kernels.cu.
//
// What this first CUDA backend fuses: everything around the convolution. The conv itself
// is at::convolution on a channels_last input; its epilogue (conv_bn_act), the input
// prologue and the statistics (conv_stats) are our own kernels, one launch each (two for
// the deterministic statistics: per-chunk partials, then a fixed-order merge).
//
// Opt-in: FUSED_RESNET_CUDA_CONV=igemm (read on every call) runs supported convolutions
// (float16/bfloat16, or float32 as TF32 when torch.backends.cudnn.allow_tf32 allows it; any
// groups with C / groups and K / groups multiples of 8 (4 for float32); 16-byte aligned data;
// compute capability >= 8.0) through our own tensor-core implicit GEMM (igemm.cu) with the
// epilogue / statistics fused into the same launch; anything else still goes to cuDNN, and
// a one-time warning says so. The DEFAULT STAYS cuDNN until igemm has passed tests/gpu on a
// real GPU (it has been compiled and its index math emulated on the host only). On that
// path conv_stats' input prologue (in_scale / in_shift / in_relu) is fused too.
//
// Graph-capture safety: no host synchronization, no .item(), workspaces come from the
// caching allocator (at::empty) and every launch goes to the current stream.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <c10/core/Storage.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "checks.h"
#include "storage_key.h"
#include "igemm.cuh"
#include "kernels.cuh"

namespace fused_resnet {
namespace {

namespace fk = fused_resnet::cuda;
constexpr auto kCL = at::MemoryFormat::ChannelsLast;

fk::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return fk::DType::Float32;
    case at::kHalf:
      return fk::DType::Float16;
    case at::kBFloat16:
      return fk::DType::BFloat16;
    case at::kDouble:
      return fk::DType::Float64;
    default:
      TORCH_CHECK(false, "fused_resnet CUDA kernels: unsupported dtype ", t);
  }
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
}

// A dense copy (or the tensor itself) of an optional per-channel vector; undefined if absent.
at::Tensor dense_vector(const std::optional<at::Tensor>& v) {
  return present(v) ? v->contiguous() : at::Tensor();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// NHWC rows of a (N, C, H, W) shape.
int64_t rows_of(at::IntArrayRef sizes) { return sizes[0] * sizes[2] * sizes[3]; }

at::Tensor empty_nhwc(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::empty(sizes, opts.memory_format(kCL));
}

// True when t has exactly the strides at::empty(..., channels_last) gives its sizes, i.e.
// it is a dense [N*H*W, C] row-major matrix laid out the way our outputs are promised.
bool has_nhwc_strides(const at::Tensor& t) {
  const auto s = t.sizes();
  const auto st = t.strides();
  return st[1] == 1 && st[3] == s[1] && st[2] == s[1] * s[3] && st[0] == s[1] * s[3] * s[2];
}

// conv(x, w) in x's dtype with NHWC output. x is already channels_last-contiguous, so cuDNN
// runs NHWC and returns NHWC; anything else (float64, which cuDNN runs NCHW, or odd strides
// for size-1 dims) is copied once into a fresh NHWC tensor.
at::Tensor conv_nhwc(const at::Tensor& xin, const at::Tensor& w, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     at::IntArrayRef out_shape) {
  if (c10::multiply_integers(out_shape) == 0) return empty_nhwc(out_shape, xin.options());
  at::Tensor c = at::convolution(xin, w, std::nullopt, stride, padding, dilation,
                                 /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
  TORCH_INTERNAL_ASSERT(c.sizes() == out_shape, "conv output shape ", c.sizes(), " != ", out_shape);
  if (!has_nhwc_strides(c)) {
    at::Tensor out = empty_nhwc(out_shape, c.options());
    out.copy_(c);
    c = out;
  }
  return c;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---------------------------------------------------------------------------------------
// The igemm opt-in (see the top of this file).

bool igemm_requested() {
  const char* v = std::getenv("FUSED_RESNET_CUDA_CONV");
  return v != nullptr && std::strcmp(v, "igemm") == 0;
}

bool aligned16(const at::Tensor& t) {
  return !t.defined() || (reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) & 15u) == 0;
}

// igemm's weight operand: the (K, R, S, C / groups)-dense weight, i.e. the weight in
// channels_last. A channels_last-contiguous weight is used as it is; any other layout (the
// usual NCHW-contiguous nn.Conv2d weight when the model was not converted) would be copied on
// every call, so the copy is cached -- the C++ twin of the Triton pack cache
// (fused_resnet/triton/_pack.py) and of csrc/cpu/onednn.cpp's cache:
// * Key: the weight's storage (StorageImpl address, pinned by a weak reference so that it
//   cannot be reused by another storage while the entry exists) and storage offset. An entry
//   is served when all of these still match: storage alive, data pointer, sizes, strides,
//   dtype, the version counter (bumped by every in-place write through the weight or a
//   view / detach of it: optimizer steps, copy_, load_state_dict) and the current stream (the
//   copy was enqueued on the entry's stream; another stream repacks rather than race it).
//   Any mismatch copies afresh and replaces the entry: one entry per weight.
// * Bypassed (copied per call, nothing stored): inference tensors (no version counter, so an
//   in-place update could not be seen), and while the current stream is capturing a CUDA
//   graph (a replay runs no host code: a cached copy would be replayed as a constant after an
//   optimizer step updated the weight in place; copying inside the capture makes every replay
//   re-copy the live weight). FUSED_RESNET_CUDA_WEIGHT_CACHE=0 (read per call) disables it.
// * Not seen: writes through `weight.data` (a separate version counter), as for autograd.
// * Memory: one copy per cached weight. Entries whose storage died are swept on every insert
//   (a per-call temporary such as an autocast-cast weight leaves a dead entry until then);
//   past kWeightCacheMax live entries the whole cache is dropped.
// * Thread safety: one mutex around lookups and inserts; the copy runs outside it (two threads
//   missing at once both copy, the last insert wins -- both results are correct).
struct WeightEntry {
  explicit WeightEntry(c10::weak_intrusive_ptr<c10::StorageImpl> s) : storage(std::move(s)) {}
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data = nullptr;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  uint32_t version = 0;
  cudaStream_t stream = nullptr;
  at::Tensor packed;
};
using WeightKey = StorageKey;
using WeightKeyHash = StorageKeyHash;
constexpr size_t kWeightCacheMax = 512;  // > the convolutions of any torchvision ResNet/ResNeXt
std::mutex weight_cache_mutex;
std::unordered_map<WeightKey, WeightEntry, WeightKeyHash>& weight_cache() {
  static auto* c = new std::unordered_map<WeightKey, WeightEntry, WeightKeyHash>();  // never destroyed
  return *c;
}

bool weight_cache_enabled() {
  const char* v = std::getenv("FUSED_RESNET_CUDA_WEIGHT_CACHE");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

at::Tensor igemm_weight(const at::Tensor& weight) {
  if (weight.is_contiguous(kCL)) return weight;  // already (K, R, S, C / groups) dense
  if (!weight_cache_enabled() || weight.is_inference() ||
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return weight.contiguous(kCL);
  const uint32_t version = static_cast<uint32_t>(weight._version());
  const cudaStream_t stream = current_stream();
  const WeightKey key = WeightKey::of(weight);
  {
    std::lock_guard<std::mutex> lock(weight_cache_mutex);
    auto it = weight_cache().find(key);
    if (it != weight_cache().end()) {
      const WeightEntry& e = it->second;
      if (!e.storage.expired() && e.data == weight.const_data_ptr() && e.version == version &&
          e.dtype == weight.scalar_type() && e.stream == stream &&
          at::IntArrayRef(e.sizes) == weight.sizes() && at::IntArrayRef(e.strides) == weight.strides())
        return e.packed;
    }
  }
  WeightEntry e(weight.storage().getWeakStorageImpl());
  e.data = weight.const_data_ptr();
  e.sizes = weight.sizes().vec();
  e.strides = weight.strides().vec();
  e.dtype = weight.scalar_type();
  e.version = version;
  e.stream = stream;
  e.packed = weight.contiguous(kCL);
  at::Tensor packed = e.packed;
  std::lock_guard<std::mutex> lock(weight_cache_mutex);
  auto& c = weight_cache();
  for (auto it = c.begin(); it != c.end();) it = it->second.storage.expired() ? c.erase(it) : std::next(it);
  if (c.size() >= kWeightCacheMax) c.clear();
  c.insert_or_assign(key, std::move(e));
  return packed;
}

// Whether torch allows TF32 for a float32 convolution, read on every call (a per-call
// decision, like cuDNN's). PyTorch's own convolutions consult the cuDNN flag
// (torch.backends.cudnn.allow_tf32, in torch >= 2.9 also set through
// torch.backends.cudnn.conv.fp32_precision = "tf32"), not torch.backends.cuda.matmul.allow_tf32
// (cuBLAS matmuls only); igemm follows the same flag so that FUSED_RESNET_CUDA_CONV=igemm never
// changes the precision a float32 model gets. The conv-specific query is used where torch has
// one (the no-argument form throws when the conv and RNN flags were set differently). Its
// signature changed across torch versions -- allowTF32CuDNN(std::optional<at::Float32Op>),
// allowTF32CuDNN(const std::string&), allowTF32CuDNN() -- so the parameter type is read off the
// member function instead of guessing from version numbers.
template <typename R, typename C, typename A>
A tf32_query_arg(R (C::*)(A) const);
template <typename R, typename C>
void tf32_query_arg(R (C::*)() const);

template <typename Ctx>
bool tf32_conv_allowed_in(const Ctx& ctx) {
  using A = std::decay_t<decltype(tf32_query_arg(&Ctx::allowTF32CuDNN))>;
  if constexpr (std::is_void_v<A>) {
    return ctx.allowTF32CuDNN();
  } else if constexpr (std::is_same_v<A, std::string>) {
    return ctx.allowTF32CuDNN(std::string("conv"));
  } else {  // std::optional<at::Float32Op>
    return ctx.allowTF32CuDNN(A::value_type::CONV);
  }
}

bool tf32_conv_allowed() { return tf32_conv_allowed_in(at::globalContext()); }

// The igemm description of conv(xin, w) when the kernel can run it, else nullopt (cuDNN).
// xin must be channels_last-contiguous; `wc` receives the (K, R, S, C / groups)-dense weight.
// `extra` is one more tensor the kernel reads or writes directly (the residual) that must be
// 16-byte aligned too.
//
// dtypes: float16 / bfloat16 always; float32 only when tf32_conv_allowed() (TF32 tensor-core
// math, as cuDNN would use under that flag); when TF32 is not allowed, float32 stays on cuDNN,
// which then computes in exact fp32 -- the correct, slower path. float64: cuDNN.
// Groups: C / groups and K / groups must be multiples of the 16-byte vector (8 elements for
// 16-bit dtypes, 4 for float32); e.g. resnext50_32x4d's first stage (C / groups = 4) runs on
// cuDNN in float16 / bfloat16.
std::optional<fk::IgemmConv> igemm_plan(const at::Tensor& xin, const at::Tensor& weight,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups,
                                        at::IntArrayRef out_shape, at::Tensor& wc,
                                        const at::Tensor& extra = at::Tensor()) {
  if (!igemm_requested()) return std::nullopt;
  const auto dt = xin.scalar_type();
  const char* why = nullptr;
  if (dt == at::kFloat) {
    if (!tf32_conv_allowed())
      why = "float32 with TF32 disallowed (torch.backends.cudnn.allow_tf32 is False): cuDNN "
            "computes it in exact float32";
  } else if (dt != at::kHalf && dt != at::kBFloat16) {
    why = "dtype not float16/bfloat16/float32";
  }
  std::optional<fk::IgemmConv> plan;
  if (why == nullptr) {
    // mma.sync / ldmatrix / cp.async need sm_80+ (cudaDeviceGetAttribute: no sync, cheap).
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                          xin.get_device()));
    const int64_t vec = dt == at::kFloat ? 4 : 8;
    const int64_t cg = xin.size(1) / groups, kg = weight.size(0) / groups;
    if (major < 8) {
      why = "compute capability < 8.0";
    } else if (weight.device() != xin.device()) {
      why = "weight on another device";
    } else if (cg % vec != 0 || kg % vec != 0) {
      why = dt == at::kFloat ? "channels per group (C / groups or K / groups) not a multiple of 4"
                             : "channels per group (C / groups or K / groups) not a multiple of 8";
    }
  }
  if (why == nullptr) {
    wc = igemm_weight(weight);
    fk::IgemmConv c;
    c.x = xin.const_data_ptr();
    c.w = wc.const_data_ptr();
    c.n = xin.size(0);
    c.c = xin.size(1);
    c.h = xin.size(2);
    c.w_in = xin.size(3);
    c.k = wc.size(0);
    c.r = wc.size(2);
    c.s = wc.size(3);
    c.p = out_shape[2];
    c.q = out_shape[3];
    c.stride_h = stride[0];
    c.stride_w = stride[1];
    c.pad_h = padding[0];
    c.pad_w = padding[1];
    c.dil_h = dilation[0];
    c.dil_w = dilation[1];
    c.groups = groups;
    if (!aligned16(extra))
      why = "residual not 16-byte aligned";
    else if (!fk::igemm_supported(to_kernel_dtype(dt), c))
      why = "unaligned tensors or sizes beyond the int32 index math";
    else
      plan = c;
  }
  if (!plan) {
    TORCH_WARN_ONCE("FUSED_RESNET_CUDA_CONV=igemm: a convolution the igemm kernel does not "
                    "support runs through cuDNN instead (igemm needs float16/bfloat16, or "
                    "float32 with TF32 allowed; input and output channels per group divisible "
                    "by 8 (by 4 for float32); 16-byte aligned tensors; compute capability >= "
                    "8.0); first such call: ", why, "; x ", xin.sizes(), " ", dt, ", weight ",
                    weight.sizes(), ", groups ", groups);
  }
  return plan;
}

// ---------------------------------------------------------------------------------------

at::Tensor conv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, bool relu) {
  check_cuda(x, "x");
  const ConvGeometry geo = check_conv(x, weight, stride, padding, dilation, groups);
  const at::IntArrayRef out_shape(geo.out_shape);
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t k = weight.size(0);
  check_vector(scale, "scale", k, acc, x.device());
  check_vector(shift, "shift", k, acc, x.device());
  check_residual(residual, "residual", out_shape, x, "x");

  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xin = x.contiguous(kCL);
  const at::Tensor res = present(residual) ? residual->contiguous(kCL) : at::Tensor();
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
  at::Tensor wc;
  if (const auto plan = igemm_plan(xin, weight, stride, padding, dilation, groups, out_shape, wc,
                                   res)) {
    // One launch: conv + scale/shift + residual + ReLU, rounded once (igemm.cu).
    at::Tensor y = empty_nhwc(out_shape, x.options());
    if (y.numel() == 0) return y;
    C10_CUDA_CHECK(fk::igemm_conv_bn_act(to_kernel_dtype(x.scalar_type()), *plan,
                                         sc.const_data_ptr<float>(), sh.const_data_ptr<float>(),
                                         ptr_or_null(res), relu, y.data_ptr(), current_stream()));
    return y;
  }
  at::Tensor y = conv_nhwc(xin, weight, stride, padding, dilation, groups, out_shape);
  if (y.numel() == 0) return y;
  fk::ChannelAffine p;
  p.scale = sc.const_data_ptr();
  p.shift = sh.const_data_ptr();
  // In place on the fresh conv output: one read and one write of y.
  C10_CUDA_CHECK(fk::affine_act(to_kernel_dtype(x.scalar_type()), y.const_data_ptr(),
                                ptr_or_null(res), y.data_ptr(), rows_of(out_shape), k, p, relu,
                                current_stream()));
  return y;
}

// conv_bn_act into residual's memory. Computed as conv_bn_act computes it and copied in (no
// in-place epilogue on CUDA yet: the eval plans use this op on the CPU backend only).
void conv_bn_act_residual_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                               const at::Tensor& shift, const at::Tensor& residual, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  check_cuda(x, "x");
  const ConvGeometry geo = check_conv(x, weight, stride, padding, dilation, groups);
  check_residual_inplace(residual, geo.out_shape, x, weight, scale, shift);
  mark_modified(residual);  // before any work: throws for an inference tensor outside inference mode
  residual.copy_(conv_bn_act_cuda(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu));
}

std::tuple<at::Tensor, at::Tensor> conv_stats_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, bool in_relu, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_cuda(x, "x");
  const ConvGeometry geo = check_conv(x, weight, stride, padding, dilation, groups);
  const at::IntArrayRef out_shape(geo.out_shape);
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t c = x.size(1), k = weight.size(0);
  check_vector(in_scale, "in_scale", c, acc, x.device());
  check_vector(in_shift, "in_shift", c, acc, x.device());

  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = current_stream();
  const fk::DType dt = to_kernel_dtype(x.scalar_type());
  at::Tensor xin = x.contiguous(kCL);
  const at::TensorOptions acc_opts = x.options().dtype(acc);
  at::Tensor stats = at::empty({2, k}, acc_opts);
  const int64_t rows = rows_of(out_shape);
  const at::Tensor isc = dense_vector(in_scale), ish = dense_vector(in_shift);
  at::Tensor wc;
  if (const auto plan = igemm_plan(xin, weight, stride, padding, dilation, groups, out_shape, wc)) {
    // Prologue, conv, z and per-(128-row tile, channel) partials in one launch; the
    // fixed-order merge in a second.
    at::Tensor z = empty_nhwc(out_shape, x.options());
    at::Tensor ws = at::empty({std::max<int64_t>(1, fk::igemm_stats_chunks(rows)) * 2 * k},
                              x.options().dtype(at::kDouble));
    C10_CUDA_CHECK(fk::igemm_conv_stats(
        dt, *plan, isc.defined() ? isc.const_data_ptr<float>() : nullptr,
        ish.defined() ? ish.const_data_ptr<float>() : nullptr, in_relu, z.data_ptr(),
        ws.data_ptr(), stats.data_ptr<float>(), stream));
    return {z, stats};
  }
  if (present(in_scale) || present(in_shift) || in_relu) {
    // Prologue: relu?(x * in_scale + in_shift) rounded to x's dtype, as the conv consumes
    // it; zero padding then applies to the transformed input, as the contract says.
    at::Tensor t = empty_nhwc(x.sizes(), x.options());
    fk::ChannelAffine p;
    p.scale = ptr_or_null(isc);
    p.shift = ptr_or_null(ish);
    C10_CUDA_CHECK(fk::affine_act(dt, xin.const_data_ptr(), nullptr, t.data_ptr(),
                                  rows_of(x.sizes()), c, p, in_relu, stream));
    xin = t;
  }
  at::Tensor z = conv_nhwc(xin, weight, stride, padding, dilation, groups, out_shape);
  const int64_t chunks = fk::reduce_chunks(rows, k);
  at::Tensor ws = at::empty({chunks * 2 * k}, x.options().dtype(at::kDouble));
  C10_CUDA_CHECK(fk::channel_stats(dt, z.const_data_ptr(), rows, k, ws.data_ptr(),
                                   stats.data_ptr(), stream));
  return {z, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_cuda(
    const at::Tensor& stats, int64_t count, const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& beta, double eps) {
  check_stats(stats, "stats");
  check_cuda(stats, "stats");
  TORCH_CHECK(count >= 1, "count: expected >= 1 (values per channel in stats), got ", count);
  const int64_t k = stats.size(1);
  const auto acc = stats.scalar_type();
  check_vector(gamma, "gamma", k, acc, stats.device());
  check_vector(beta, "beta", k, acc, stats.device());

  c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor st = stats.contiguous();
  const at::Tensor g = dense_vector(gamma), b = dense_vector(beta);
  // Four separate tensors: outputs of an op must not alias its inputs or each other (the
  // reference's save_mean is a view of stats; ours is a copy).
  at::Tensor scale = at::empty({k}, stats.options());
  at::Tensor shift = at::empty({k}, stats.options());
  at::Tensor save_mean = at::empty({k}, stats.options());
  at::Tensor save_invstd = at::empty({k}, stats.options());
  C10_CUDA_CHECK(fk::bn_finalize(to_kernel_dtype(acc), st.const_data_ptr(), k, count,
                                 ptr_or_null(g), ptr_or_null(b), eps, scale.data_ptr(),
                                 shift.data_ptr(), save_mean.data_ptr(), save_invstd.data_ptr(),
                                 current_stream()));
  return {scale, shift, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_backward_cuda(
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& grad_shift,
    const std::optional<at::Tensor>& grad_mean, const std::optional<at::Tensor>& grad_invstd,
    const std::optional<at::Tensor>& gamma, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& invstd, int64_t count) {
  const int64_t k = check_bn_finalize_backward(grad_scale, grad_shift, grad_mean, grad_invstd, gamma, scale, mean,
                                                 invstd, count);
  const auto acc = scale.scalar_type();
  check_cuda(scale, "scale");

  c10::cuda::CUDAGuard guard(scale.device());
  const at::Tensor gs = dense_vector(grad_scale), gb = dense_vector(grad_shift), ga = dense_vector(gamma);
  const at::Tensor gm = dense_vector(grad_mean), gi = dense_vector(grad_invstd);
  const at::Tensor sc = scale.contiguous(), mn = mean.contiguous(), is = invstd.contiguous();
  at::Tensor grad_stats = at::empty({2, k}, scale.options());
  at::Tensor grad_gamma = at::empty({k}, scale.options());
  C10_CUDA_CHECK(fk::bn_finalize_backward(to_kernel_dtype(acc), ptr_or_null(gs), ptr_or_null(gb),
                                          ptr_or_null(gm), ptr_or_null(gi), ptr_or_null(ga),
                                          sc.const_data_ptr(), mn.const_data_ptr(), is.const_data_ptr(),
                                          k, count, grad_stats.data_ptr(),
                                          grad_gamma.data_ptr(), current_stream()));
  return {grad_stats, grad_gamma};
}

void check_running(const at::Tensor& t, const char* name, int64_t k, const at::Device& device) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.device() == device, name, ": expected device ", device, " (same as stats), got ",
              t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == k, name, ": expected shape (", k, ",), got ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              name, ": expected float32, float64, float16 or bfloat16, got ", dt);
}

void bn_update_running_stats_cuda(const at::Tensor& stats, int64_t count,
                                  const at::Tensor& running_mean, const at::Tensor& running_var,
                                  const std::optional<at::Tensor>& num_batches_tracked,
                                  std::optional<double> momentum) {
  check_stats(stats, "stats");
  check_cuda(stats, "stats");
  TORCH_CHECK(count > 1, "count: expected more than 1 value per channel when training (as "
              "nn.BatchNorm2d), got ", count);
  const int64_t k = stats.size(1);
  check_running(running_mean, "running_mean", k, stats.device());
  check_running(running_var, "running_var", k, stats.device());
  TORCH_CHECK(running_var.scalar_type() == running_mean.scalar_type(), "running_var: expected dtype ",
              running_mean.scalar_type(), " (same as running_mean), got ", running_var.scalar_type());
  const bool has_nbt = present(num_batches_tracked);
  if (has_nbt) {
    const at::Tensor& n = *num_batches_tracked;
    TORCH_CHECK(n.device() == stats.device(), "num_batches_tracked: expected device ",
                stats.device(), " (same as stats), got ", n.device());
    TORCH_CHECK(n.scalar_type() == at::kLong, "num_batches_tracked: expected dtype int64, got ",
                n.scalar_type());
    TORCH_CHECK(n.numel() == 1, "num_batches_tracked: expected a single element, got shape ",
                n.sizes());
  }
  TORCH_CHECK(momentum.has_value() || has_nbt,
              "momentum: None (cumulative moving average) needs num_batches_tracked, got None");

  c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor st = stats.contiguous();
  // Non-dense buffers are updated through a dense copy and written back (stream-ordered).
  at::Tensor rm = running_mean.is_contiguous() ? running_mean : running_mean.contiguous();
  at::Tensor rv = running_var.is_contiguous() ? running_var : running_var.contiguous();
  int64_t* nbt = has_nbt ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  C10_CUDA_CHECK(fk::bn_update_running_stats(
      to_kernel_dtype(st.scalar_type()), st.const_data_ptr(), k, count,
      to_kernel_dtype(rm.scalar_type()), rm.data_ptr(), rv.data_ptr(), nbt, momentum.has_value(),
      momentum.value_or(0.0), current_stream()));
  if (!rm.is_same(running_mean)) running_mean.copy_(rm);
  if (!rv.is_same(running_var)) running_var.copy_(rv);
  mark_modified(running_mean);
  mark_modified(running_var);
  if (has_nbt) mark_modified(*num_batches_tracked);
}

// What bn_add_act and its backward share: validation (z, then grad_out when given, then the
// per-channel vectors and the residual, in that order) and the dense inputs the kernels read.
// Validation happens before any device guard or allocation, as in every other entry point.
struct BnAddActInputs {
  int64_t k;
  at::ScalarType acc;
  bool has_res;
  at::Tensor zc, res, sc, sh, rsc, rsh;
};

BnAddActInputs prepare_bn_add_act(const at::Tensor& z, const at::Tensor& scale,
                                  const at::Tensor& shift,
                                  const std::optional<at::Tensor>& residual,
                                  const std::optional<at::Tensor>& res_scale,
                                  const std::optional<at::Tensor>& res_shift,
                                  const at::Tensor* grad_out = nullptr) {
  check_activation(z, "z");
  check_cuda(z, "z");
  if (grad_out != nullptr) {
    check_activation(*grad_out, "grad_out");
    check_like(*grad_out, "grad_out", z, "z");
    TORCH_CHECK(grad_out->sizes() == z.sizes(), "grad_out: expected shape ", z.sizes(),
                " (same as z), got ", grad_out->sizes());
  }
  BnAddActInputs in;
  in.k = z.size(1);
  in.acc = acc_dtype(z.scalar_type());
  check_vector(scale, "scale", in.k, in.acc, z.device());
  check_vector(shift, "shift", in.k, in.acc, z.device());
  check_vector(res_scale, "res_scale", in.k, in.acc, z.device());
  check_vector(res_shift, "res_shift", in.k, in.acc, z.device());
  check_residual(residual, "residual", z.sizes(), z, "z");
  // Dense copies (or the tensors themselves); ATen runs any copy on the tensor's own device.
  in.has_res = present(residual);
  in.zc = z.contiguous(kCL);
  in.res = in.has_res ? residual->contiguous(kCL) : at::Tensor();
  in.sc = scale.contiguous();
  in.sh = shift.contiguous();
  // As the reference: the residual's own BN only means something with a residual.
  in.rsc = in.has_res ? dense_vector(res_scale) : at::Tensor();
  in.rsh = in.has_res ? dense_vector(res_shift) : at::Tensor();
  return in;
}

at::Tensor bn_add_act_cuda(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& res_scale,
                           const std::optional<at::Tensor>& res_shift, bool relu) {
  const BnAddActInputs in = prepare_bn_add_act(z, scale, shift, residual, res_scale, res_shift);

  c10::cuda::CUDAGuard guard(z.device());
  at::Tensor y = empty_nhwc(z.sizes(), z.options());
  if (y.numel() == 0) return y;
  fk::ChannelAffine p;
  p.scale = in.sc.const_data_ptr();
  p.shift = in.sh.const_data_ptr();
  p.res_scale = ptr_or_null(in.rsc);
  p.res_shift = ptr_or_null(in.rsh);
  C10_CUDA_CHECK(fk::affine_act(to_kernel_dtype(z.scalar_type()), in.zc.const_data_ptr(),
                                ptr_or_null(in.res), y.data_ptr(), rows_of(z.sizes()), in.k, p,
                                relu, current_stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& res_shift,
    bool relu) {
  const BnAddActInputs in =
      prepare_bn_add_act(z, scale, shift, residual, res_scale, res_shift, &grad_out);
  const int64_t k = in.k;

  c10::cuda::CUDAGuard guard(z.device());
  const bool has_res = in.has_res;
  const bool has_rs = has_res && present(res_scale);
  const at::TensorOptions acc_opts = z.options().dtype(in.acc);
  at::Tensor grad_z = empty_nhwc(z.sizes(), z.options());
  at::Tensor grad_scale = at::empty({k}, acc_opts);
  at::Tensor grad_shift = at::empty({k}, acc_opts);
  // Empty (numel 0) 1-D tensors where the reference returns them.
  at::Tensor grad_residual = has_res ? empty_nhwc(z.sizes(), z.options()) : at::empty({0}, z.options());
  at::Tensor grad_res_scale = has_rs ? at::empty({k}, acc_opts) : at::empty({0}, acc_opts);

  const at::Tensor go = grad_out.contiguous(kCL);
  const int64_t rows = rows_of(z.sizes());
  at::Tensor ws = at::empty({fk::reduce_chunks(rows, k) * 3 * k}, acc_opts);
  C10_CUDA_CHECK(fk::bn_add_act_backward(
      to_kernel_dtype(z.scalar_type()), go.const_data_ptr(), in.zc.const_data_ptr(),
      ptr_or_null(in.res), in.sc.const_data_ptr(), in.sh.const_data_ptr(), ptr_or_null(in.rsc),
      ptr_or_null(in.rsh), relu, rows, k, grad_z.data_ptr(),
      has_res ? grad_residual.data_ptr() : nullptr, ws.data_ptr(), grad_scale.data_ptr(),
      grad_shift.data_ptr(), has_rs ? grad_res_scale.data_ptr() : nullptr, current_stream()));
  return {grad_z, grad_scale, grad_shift, grad_residual, grad_res_scale};
}

at::Tensor stats_backward_cuda(const at::Tensor& grad_z, const at::Tensor& grad_stats,
                               const at::Tensor& z, const at::Tensor& stats, int64_t count) {
  check_activation(z, "z");
  check_cuda(z, "z");
  check_activation(grad_z, "grad_z");
  check_like(grad_z, "grad_z", z, "z");
  TORCH_CHECK(grad_z.sizes() == z.sizes(), "grad_z: expected shape ", z.sizes(),
              " (same as z), got ", grad_z.sizes());
  const int64_t k = z.size(1);
  const auto acc = acc_dtype(z.scalar_type());
  check_stats(stats, "stats", k);
  check_stats(grad_stats, "grad_stats", k);
  auto check_acc_like_z = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == z.device(), name, ": expected device ", z.device(),
                " (same as z), got ", t.device());
    TORCH_CHECK(t.scalar_type() == acc, name, ": expected dtype ", acc,
                " (the accumulation dtype of z's ", z.scalar_type(), "), got ", t.scalar_type());
  };
  check_acc_like_z(stats, "stats");
  check_acc_like_z(grad_stats, "grad_stats");
  TORCH_CHECK(count >= 1 || z.numel() == 0,
              "count: expected >= 1 (values per channel in stats), got ", count);

  c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = empty_nhwc(z.sizes(), z.options());
  if (out.numel() == 0) return out;
  const at::Tensor zc = z.contiguous(kCL), gz = grad_z.contiguous(kCL);
  const at::Tensor st = stats.contiguous(), gst = grad_stats.contiguous();
  // grad_z + grad_mean / count + 2 * grad_M2 * (z - mean), as the elementwise family's
  // (z - center) * scale * scale_mul + shift * shift_mul + residual: subtracting the mean
  // before scaling keeps it accurate when |mean| >> std.
  const size_t row_bytes = static_cast<size_t>(k) * c10::elementSize(acc);
  fk::ChannelAffine p;
  p.center = st.const_data_ptr();
  p.scale = static_cast<const char*>(gst.const_data_ptr()) + row_bytes;
  p.scale_mul = 2.0;
  p.shift = gst.const_data_ptr();
  p.shift_mul = 1.0 / static_cast<double>(count);
  C10_CUDA_CHECK(fk::affine_act(to_kernel_dtype(z.scalar_type()), zc.const_data_ptr(),
                                gz.const_data_ptr(), out.data_ptr(), rows_of(z.sizes()), k, p,
                                /*relu=*/false, current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("conv_bn_act", &conv_bn_act_cuda);
  m.impl("conv_bn_act_residual_", &conv_bn_act_residual_cuda);
  m.impl("conv_stats", &conv_stats_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_finalize_backward", &bn_finalize_backward_cuda);
  m.impl("bn_update_running_stats", &bn_update_running_stats_cuda);
  m.impl("bn_add_act", &bn_add_act_cuda);
  m.impl("bn_add_act_backward", &bn_add_act_backward_cuda);
  m.impl("stats_backward", &stats_backward_cuda);
}

}  // namespace fused_resnet
