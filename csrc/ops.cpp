// The op schemas, declared once; backends register under CPU (csrc/cpu) and CUDA (csrc/cuda).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing bisam_kernels._C loads this library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(bisam, m) {
  // Sum of g^2 over all grads, or of (|w| * g)^2 when adaptive (then params pairs with grads).
  m.def("grad_sq_norm(Tensor[] grads, Tensor[] params, bool adaptive) -> Tensor");
  // backup <- w; w <- w + rho * (w^2 if adaptive else 1) * g / (norm + eps); returns the norm.
  // rho comes from rho_tensor (on the device) when given, else from the float.
  // With sq_norm given the norm is sqrt(sq_norm) and no reduction runs.
  m.def(
      "sam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, float rho, Tensor? rho_tensor, "
      "bool adaptive, float eps, Tensor? sq_norm) -> Tensor");
  // w <- backup, bit-exact.
  m.def("sam_restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
}
