// fused_resnet._C: every op's schema, declared once, plus the Python module
// that carries build information. Kernels register themselves per dispatch key
// in csrc/cpu/ and csrc/cuda/; autograd, fake kernels and autocast live in
// fused_resnet/ops.py. The exact meaning of each op is fused_resnet/reference.py.
//
// Conventions shared by every op:
//   activations   4-D, logical (N, C, H, W), returned channels_last (NHWC in memory);
//                 inputs in another layout are accepted and read once into NHWC.
//   per-channel   1-D float32 vectors (float64 when the activation is float64),
//                 the "accumulation dtype" of the call.
//   stats         (2, K) tensor in the accumulation dtype: row 0 the per-channel
//                 mean of z, row 1 its M2 (sum of squared deviations from the mean)
//                 over the count = N*P*Q output pixels.
#include <Python.h>
#include <torch/library.h>

#ifndef FUSED_RESNET_TORCH_VERSION
#define FUSED_RESNET_TORCH_VERSION "unknown"
#endif
#ifndef FUSED_RESNET_CUDA_ARCHS
#define FUSED_RESNET_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fused_resnet, m) {
  // y = act(conv(x, weight) * scale + shift (+ residual)): BatchNorm folded, inference.
  m.def(
      "conv_bn_act(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
  // conv_bn_act whose result overwrites residual (in place; returns nothing):
  // residual = act(conv(x, weight) * scale + shift + residual). For inference code that owns
  // residual and has no further use for it (a block's shortcut): no new output buffer. residual
  // must not overlap x or weight; no autograd (an error when a gradient would be needed).
  m.def(
      "conv_bn_act_residual_(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor(a!) residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> ()");
  // z = conv(act_in(x * in_scale + in_shift), weight); stats = per-channel (mean, M2) of z.
  // Zero padding applies to the transformed input.
  m.def(
      "conv_stats(Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, bool in_relu, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor z, Tensor stats)");
  // (scale, shift, save_mean, save_invstd) from batch statistics; pure (no running stats).
  m.def(
      "bn_finalize(Tensor stats, int count, Tensor? gamma, Tensor? beta, float eps) "
      "-> (Tensor scale, Tensor shift, Tensor save_mean, Tensor save_invstd)");
  // bn_finalize's backward from the gradients of its four outputs (any may be None = 0):
  // grad_stats (2, K) = (d mean, d M2), grad_gamma (K,). One launch instead of ~12 vector ops.
  m.def(
      "bn_finalize_backward(Tensor? grad_scale, Tensor? grad_shift, Tensor? grad_mean, "
      "Tensor? grad_invstd, Tensor? gamma, Tensor scale, Tensor mean, Tensor invstd, int count) "
      "-> (Tensor grad_stats, Tensor grad_gamma)");
  // nn.BatchNorm2d's running-statistics update from the same batch statistics.
  m.def(
      "bn_update_running_stats(Tensor stats, int count, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, float? momentum) -> ()");
  // y = act(z * scale + shift (+ residual * res_scale + res_shift | + residual)).
  m.def(
      "bn_add_act(Tensor z, Tensor scale, Tensor shift, Tensor? residual, Tensor? res_scale, "
      "Tensor? res_shift, bool relu) -> Tensor");
  // Backward of bn_add_act in one pass: g' = grad_out * (pre-activation > 0 if relu);
  // grad_z = g' * scale, grad_scale = sum(g' * z), grad_shift = sum(g'),
  // grad_residual = g' * res_scale (or g'), grad_res_scale = sum(g' * residual).
  // grad_residual is empty (numel 0) without residual, grad_res_scale without res_scale;
  // the gradient of res_shift equals grad_shift.
  m.def(
      "bn_add_act_backward(Tensor grad_out, Tensor z, Tensor scale, Tensor shift, Tensor? residual, "
      "Tensor? res_scale, Tensor? res_shift, bool relu) "
      "-> (Tensor grad_z, Tensor grad_scale, Tensor grad_shift, Tensor grad_residual, "
      "Tensor grad_res_scale)");
  // Gradient reaching z through both outputs of conv_stats:
  // grad_z + grad_stats[0] / count + 2 * grad_stats[1] * (z - mean).
  m.def(
      "stats_backward(Tensor grad_z, Tensor grad_stats, Tensor z, Tensor stats, int count) -> Tensor");
}

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* info = PyDict_New();
  if (!info) return nullptr;
  auto put = [&](const char* key, PyObject* value) {
    if (value) {
      PyDict_SetItemString(info, key, value);
      Py_DECREF(value);
    }
  };
  put("torch_version", PyUnicode_FromString(FUSED_RESNET_TORCH_VERSION));
  // at::parallel_for is a header template: the CPU kernels are multi-threaded only where this
  // library itself was compiled with OpenMP (setup.py: openmp_flags).
#ifdef _OPENMP
  put("openmp", Py_NewRef(Py_True));
#else
  put("openmp", Py_NewRef(Py_False));
#endif
#ifdef FUSED_RESNET_WITH_CUDA
  put("cuda", Py_NewRef(Py_True));
  put("cuda_archs", PyUnicode_FromString(FUSED_RESNET_CUDA_ARCHS));
#else
  put("cuda", Py_NewRef(Py_False));
  put("cuda_archs", PyUnicode_FromString(""));
#endif
  return info;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "dict: torch version _C was compiled against, whether its CPU kernels use OpenMP threads, whether "
     "CUDA kernels are in it, and their archs."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "fused_resnet compiled kernels (ops register on import).", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
