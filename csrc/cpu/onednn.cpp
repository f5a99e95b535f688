// oneDNN fast path of conv_bn_act on CPU (float32): one oneDNN convolution whose post-ops do
// the whole epilogue, on weights folded with the BN scale and pre-packed once.
//
//   y = relu?(conv(x, weight * scale) + shift (+ residual))
//
// * scale is folded into the weight (w'[k] = w[k] * scale[k], one K*C/g*R*S pass) and shift is
//   passed as the convolution's bias, so oneDNN's GEMM epilogue applies both.
// * ReLU is oneDNN's "relu" eltwise post-op; the shortcut is its "add" binary post-op followed
//   by "relu" (mkldnn::_convolution_pointwise and its .binary overload, the ops Inductor's
//   freezing path emits). The result is written once, channels_last.
// * conv_bn_act_residual_ (into_residual): the shortcut is instead oneDNN's "sum" post-op,
//   accumulating into the residual's own memory (mkldnn::_convolution_pointwise_.binary, what
//   Inductor emits when it knows the residual is dead), so no output buffer is allocated: a fresh
//   25.7 MB buffer (ResNet-50 layer1, batch 8) costs its page faults inside the convolution.
// * The folded weight is reordered into oneDNN's blocked layout for this input shape
//   (mkldnn::_reorder_convolution_weight) and cached, so the per-call weight reorder disappears.
//
// Numerics: conv(x, w * s) rounds each w*s product to float32 (relative error <= 2^-24 per
// term) where the unfused path rounds conv(x, w) once and then multiplies; the two differ by
// about one float32 rounding per accumulated term, i.e. the same order as the accumulation's
// own rounding. Tests hold this path to the same float32 bound as every backend
// (|err| <= 2e-5 * max|y| against a float64 reference, tests/conftest.py); nothing was loosened.
//
// Only float32 takes this path. float64 is not a oneDNN type; for float16/bfloat16, folding
// would round w*s to 8/11 significant bits per weight -- an extra error the unfused path (which
// applies scale in float32 after the conv) does not have -- so those keep the existing kernel.
//
// Weight cache (the op contract lets a backend pre-pack weights, invalidated when they change):
// * Key: the weight's storage (StorageImpl address, pinned by a weak reference so that it cannot
//   be reused by another storage while the entry exists) and storage offset. An entry is valid
//   when all of these still match: storage alive, data pointer, sizes, strides, the version
//   counter (bumped by every in-place write through the weight or a view/detach of it), the
//   scale *values* (K floats compared on each call -- cheap, and scale is often recomputed per
//   call so its identity would not do), convolution geometry and the input's shape (the packed
//   layout depends on it). Any mismatch repacks and replaces the entry: one entry per weight,
//   so a weight used at alternating batch sizes repacks each time (correct, slower).
// * Not seen: writes through `weight.data` (a separate version counter), exactly the case
//   autograd cannot see either. Weights that are inference tensors (created under
//   torch.inference_mode) have no version counter: they are folded per call and not cached.
// * Memory: an entry holds a packed copy of its weight (same size). Entries whose storage has
//   died are swept on every insert; past kMaxEntries the whole cache is dropped.
// * Thread safety: one mutex around lookups and inserts; packing runs outside it (two threads
//   missing at once both pack, the last insert wins -- both results are correct).
//
// Off switch: FUSED_RESNET_CPU_ONEDNN=0 (read per call) uses the unfused path. When oneDNN is
// missing (a torch build without it), disabled (torch.backends.mkldnn.enabled = False) or
// rejects a call, the unfused path runs and a FallbackWarning says so once per reason.
#include <Python.h>

#include "cpu_kernels.h"
#include "storage_key.h"

#include <ATen/Context.h>
#include <ATen/core/List.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/mul.h>
#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fused_resnet {
namespace cpu {
namespace {

constexpr size_t kMaxEntries = 1024;

struct OneDnnOps {
  c10::OperatorHandle pointwise;  // mkldnn::_convolution_pointwise
  c10::OperatorHandle binary;     // mkldnn::_convolution_pointwise.binary
  c10::OperatorHandle binary_;    // mkldnn::_convolution_pointwise_.binary (in place into `other`)
  c10::OperatorHandle reorder;    // mkldnn::_reorder_convolution_weight
};

// The three oneDNN ops, looked up once; nullptr when this torch build lacks any of them.
const OneDnnOps* onednn_ops() {
  static const std::optional<OneDnnOps> ops = []() -> std::optional<OneDnnOps> {
    auto& d = c10::Dispatcher::singleton();
    auto a = d.findSchema({"mkldnn::_convolution_pointwise", ""});
    auto b = d.findSchema({"mkldnn::_convolution_pointwise", "binary"});
    auto c = d.findSchema({"mkldnn::_reorder_convolution_weight", ""});
    auto e = d.findSchema({"mkldnn::_convolution_pointwise_", "binary"});
    if (!a || !b || !c || !e) return std::nullopt;
    const auto cpu = c10::DispatchKey::CPU;
    if (!a->hasKernelForDispatchKey(cpu) || !b->hasKernelForDispatchKey(cpu) ||
        !c->hasKernelForDispatchKey(cpu) || !e->hasKernelForDispatchKey(cpu)) {
      return std::nullopt;
    }
    return OneDnnOps{*a, *b, *e, *c};
  }();
  return ops ? &*ops : nullptr;
}

bool disabled_by_env() {
  const char* v = std::getenv("FUSED_RESNET_CPU_ONEDNN");
  return v != nullptr && std::strcmp(v, "0") == 0;
}

std::vector<int64_t> vec(at::IntArrayRef a) { return a.vec(); }

// Says once per reason that the unfused path runs instead, as a Python warning of category
// fused_resnet.backends.FallbackWarning (UserWarning if that cannot be imported), so Python
// users can filter or catch it: a c10 TORCH_WARN raised inside a custom op's kernel reaches only
// stderr. Under a warnings "error" filter the warning becomes a RuntimeError carrying its text.
enum FallbackReason { kMissing = 0, kDisabled = 1, kRejected = 2, kNumReasons = 3 };
std::atomic<bool> warned[kNumReasons];

void warn_fallback_once(FallbackReason reason, const std::string& msg) {
  if (warned[reason].exchange(true)) return;
  if (!Py_IsInitialized()) {
    TORCH_WARN(msg);
    return;
  }
  std::string error;
  {
    const PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* category = PyExc_UserWarning;
    PyObject* backends = PyImport_ImportModule("fused_resnet.backends");
    PyObject* fallback = backends ? PyObject_GetAttrString(backends, "FallbackWarning") : nullptr;
    if (fallback != nullptr && PyType_Check(fallback)) category = fallback;
    PyErr_Clear();  // a failed import only means the plain UserWarning category
    if (PyErr_WarnEx(category, msg.c_str(), 1) != 0) {
      error = msg;
      PyErr_Clear();
    }
    Py_XDECREF(fallback);
    Py_XDECREF(backends);
    PyGILState_Release(gil);
  }
  TORCH_CHECK(error.empty(), error);
}

struct Entry {
  explicit Entry(c10::weak_intrusive_ptr<c10::StorageImpl> s) : storage(std::move(s)) {}
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data = nullptr;
  std::vector<int64_t> sizes, strides, geometry, input_sizes;
  uint32_t version = 0;
  std::vector<float> scale;
  at::Tensor packed;
};

using Key = StorageKey;
using KeyHash = StorageKeyHash;

std::mutex cache_mutex;
std::unordered_map<Key, Entry, KeyHash>& cache() {
  static auto* c = new std::unordered_map<Key, Entry, KeyHash>();  // never destroyed: no exit-order issues
  return *c;
}

bool entry_matches(const Entry& e, const at::Tensor& w, uint32_t version, const std::vector<int64_t>& geometry,
                   at::IntArrayRef input_sizes, const float* scale, int64_t k) {
  return !e.storage.expired() && e.data == w.const_data_ptr() && e.version == version &&
         at::IntArrayRef(e.sizes) == w.sizes() && at::IntArrayRef(e.strides) == w.strides() &&
         e.geometry == geometry && at::IntArrayRef(e.input_sizes) == input_sizes &&
         static_cast<int64_t>(e.scale.size()) == k && std::memcmp(e.scale.data(), scale, k * sizeof(float)) == 0;
}

at::Tensor fold(const at::Tensor& weight, const at::Tensor& scale) {
  return at::mul(weight.contiguous(), scale.view({-1, 1, 1, 1}));
}

// The folded weight in oneDNN's blocked layout for this input shape: cached (see the top).
at::Tensor packed_weight(const OneDnnOps& ops, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups) {
  const int64_t k = weight.size(0);
  const at::Tensor s = scale.contiguous();
  const float* sp = s.const_data_ptr<float>();
  const std::vector<int64_t> geometry{stride[0], stride[1], padding[0], padding[1],
                                      dilation[0], dilation[1], groups};
  const uint32_t version = static_cast<uint32_t>(weight._version());
  const Key key = Key::of(weight);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache().find(key);
    if (it != cache().end() && entry_matches(it->second, weight, version, geometry, x.sizes(), sp, k)) {
      return it->second.packed;
    }
  }
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(fold(weight, s));
  stack.emplace_back(vec(padding));
  stack.emplace_back(vec(stride));
  stack.emplace_back(vec(dilation));
  stack.emplace_back(groups);
  stack.emplace_back(vec(x.sizes()));
  ops.reorder.callBoxed(&stack);
  Entry e(weight.storage().getWeakStorageImpl());
  e.data = weight.const_data_ptr();
  e.sizes = vec(weight.sizes());
  e.strides = vec(weight.strides());
  e.geometry = geometry;
  e.input_sizes = vec(x.sizes());
  e.version = version;
  e.scale.assign(sp, sp + k);
  e.packed = stack[0].toTensor();
  at::Tensor packed = e.packed;
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& c = cache();
  for (auto it = c.begin(); it != c.end();) {
    it = it->second.storage.expired() ? c.erase(it) : std::next(it);
  }
  if (c.size() >= kMaxEntries) c.clear();
  c.insert_or_assign(key, std::move(e));
  return packed;
}

}  // namespace

at::Tensor conv_bn_act_onednn(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& residual, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                              bool into_residual) {
  if (x.scalar_type() != at::kFloat || x.numel() == 0 || weight.numel() == 0 || disabled_by_env()) {
    return {};
  }
  const OneDnnOps* ops = onednn_ops();
  if (ops == nullptr || !at::hasMKLDNN()) {
    warn_fallback_once(kMissing,
                       "fused_resnet: oneDNN convolution ops (mkldnn::_convolution_pointwise) are missing from "
                       "this torch build; conv_bn_act on CPU uses the unfused path (ATen convolution + a "
                       "separate epilogue pass)");
    return {};
  }
  if (!at::globalContext().userEnabledMkldnn()) {
    warn_fallback_once(kDisabled,
                       "fused_resnet: oneDNN is disabled (torch.backends.mkldnn.enabled is False); conv_bn_act "
                       "on CPU uses the unfused path (ATen convolution + a separate epilogue pass)");
    return {};
  }
  try {
    // Inference tensors have no version counter to validate a cache entry: fold per call.
    const at::Tensor w = weight.is_inference()
                             ? fold(weight, scale)
                             : packed_weight(*ops, x, weight, scale, stride, padding, dilation, groups);
    // A 1x1 output with a shortcut is computed in place into a copy of the shortcut: torch 2.11's
    // out-of-place binary overload fails there with a pre-packed weight ("could not create a
    // memory"; found 2026-12-06; 2.14 does not fail, the in-place overload works on both), and a
    // 1x1 output is only N*K elements to copy.
    const bool one_pixel = residual.defined() && !into_residual && residual.size(2) * residual.size(3) == 1;
    const at::Tensor other = one_pixel ? residual.clone(at::MemoryFormat::ChannelsLast) : residual;
    const bool in_place = into_residual || one_pixel;
    torch::jit::Stack stack;
    stack.reserve(13);
    if (in_place) stack.emplace_back(other);  // the in-place overload takes `other` first
    stack.emplace_back(x);
    if (residual.defined() && !in_place) stack.emplace_back(residual);
    stack.emplace_back(w);
    stack.emplace_back(shift.contiguous());  // the bias; oneDNN reads it as a dense vector
    stack.emplace_back(vec(padding));
    stack.emplace_back(vec(stride));
    stack.emplace_back(vec(dilation));
    stack.emplace_back(groups);
    if (residual.defined()) {
      stack.emplace_back(std::string("add"));  // binary_attr
      stack.emplace_back(c10::IValue());       // alpha
      stack.emplace_back(relu ? c10::IValue(std::string("relu")) : c10::IValue());
    } else {
      stack.emplace_back(std::string(relu ? "relu" : "none"));
    }
    stack.emplace_back(c10::List<std::optional<at::Scalar>>());  // post-op scalars
    stack.emplace_back(c10::IValue());                            // post-op algorithm
    if (in_place) {
      ops->binary_.callBoxed(&stack);
      return into_residual ? residual : canonical_channels_last(other);
    }
    (residual.defined() ? ops->binary : ops->pointwise).callBoxed(&stack);
    return canonical_channels_last(stack[0].toTensor());
  } catch (const std::exception& err) {
    // c10::Errors from torch's checks, and oneDNN's own errors (dnnl::error, e.g. "could not
    // create a memory"), which are not c10::Errors.
    const auto* c10_err = dynamic_cast<const c10::Error*>(&err);
    warn_fallback_once(kRejected, std::string("fused_resnet: oneDNN rejected a conv_bn_act call (") +
                                      (c10_err ? c10_err->what_without_backtrace() : err.what()) +
                                      "); conv_bn_act on CPU uses the unfused path for such calls");
    return {};
  }
}

}  // namespace cpu
}  // namespace fused_resnet
