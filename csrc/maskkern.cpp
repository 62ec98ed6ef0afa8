// The one TORCH_LIBRARY of maskkern: every native kernel's schema lives here. Kernels register
// themselves per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fakes and autograd are attached in
// Python (maskkern/ops/). These are the *kernel* ops behind the public custom ops: callers pass
// tensors already validated and normalised by the Python layer.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import maskkern._C` loads this shared object, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(maskkern, m) {
  // masked_softmax: scores (B, H, Lq, Lk); mask None or (B, H, Lq, Lk) read through its strides
  // (bool: true = keep, or scores' float dtype: added after scaling); lengths/query_lengths None
  // or int64 (B,); causal 0 = none, 1 = top-left, 2 = bottom-right. Returns a contiguous tensor.
  m.def(
      "masked_softmax_fwd(Tensor scores, Tensor? mask, Tensor? lengths, Tensor? query_lengths, "
      "int causal, float scale) -> Tensor");
  // dX = scale * Y * (dY - sum(Y * dY)); lengths/causal only let the kernel skip masked tails.
  m.def(
      "masked_softmax_bwd(Tensor grad, Tensor out, Tensor? lengths, Tensor? query_lengths, "
      "int causal, float scale) -> Tensor");
}
