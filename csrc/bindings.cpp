// tandem._C: op schemas, their kernels' registration, and the pybind11 module. No logic.
#include <torch/extension.h>
#include <torch/library.h>

#include "build_info.h"
#include "comm/python.h"
#include "ops/linear_gelu.h"
#include "ops/lt_policy.h"

namespace tandem::testing {
void bind(pybind11::module_& m);  // testing.cpp: the seams of the CPU tests
}

TORCH_LIBRARY(tandem, m) {
  m.set_python_module("tandem.ops");  // fake (meta) kernels live there
  m.def("linear_bias_gelu(Tensor input, Tensor weight, Tensor? bias, str approximate=\"tanh\") -> Tensor");
  m.def(
      "linear_bias_gelu_fwd(Tensor input, Tensor weight, Tensor? bias, str approximate=\"tanh\") "
      "-> (Tensor output, Tensor pre_activation)");
  m.def(
      "linear_bias_gelu_backward_input(Tensor grad_output, Tensor pre_activation, Tensor weight, "
      "str approximate=\"tanh\") -> (Tensor grad_input, Tensor grad_pre_activation, Tensor grad_bias)");
  m.def("linear_bias_gelu_backward_weight(Tensor grad_pre_activation, Tensor input) -> Tensor grad_weight");
  m.def(
      "linear_dgelu_bgrad(Tensor grad_output, Tensor weight, Tensor pre_activation, str approximate=\"tanh\") "
      "-> (Tensor grad_pre_activation, Tensor grad_bias)");
  m.def("_gelu_formula(Tensor x, str approximate, bool derivative) -> Tensor");  // tests only
}

#define TANDEM_REGISTER_LINEAR_GELU(m)                                                        \
  m.impl("linear_bias_gelu", &tandem::ops::linear_bias_gelu);                                 \
  m.impl("linear_bias_gelu_fwd", &tandem::ops::linear_bias_gelu_fwd);                         \
  m.impl("linear_bias_gelu_backward_input", &tandem::ops::linear_bias_gelu_backward_input);   \
  m.impl("linear_bias_gelu_backward_weight", &tandem::ops::linear_bias_gelu_backward_weight); \
  m.impl("linear_dgelu_bgrad", &tandem::ops::linear_dgelu_bgrad);                             \
  m.impl("_gelu_formula", &tandem::ops::gelu_formula);

TORCH_LIBRARY_IMPL(tandem, CPU, m) { TANDEM_REGISTER_LINEAR_GELU(m) }
#ifdef TANDEM_WITH_CUDA
TORCH_LIBRARY_IMPL(tandem, CUDA, m) { TANDEM_REGISTER_LINEAR_GELU(m) }
#endif
TORCH_LIBRARY_IMPL(tandem, Autograd, m) {
  m.impl("linear_bias_gelu", &tandem::ops::linear_bias_gelu_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tandem's compiled core";
  m.def("build_info", &tandem::build_info, "How this core was built: CUDA kernels, archs, versions");
  tandem::comm::bind(m);     // Communicator, Work, CommError, CommTimeoutError
  tandem::overlap::bind(m);  // row_parallel_linear forward, column_parallel_backward
  tandem::p2p::bind(m);      // StageLink
  m.def("_linear_gelu_paths", [] {
    const auto c = tandem::ops::path_counts();
    pybind11::dict d;
    d["forward_epilogue"] = c[0];
    d["forward_general"] = c[1];
    d["dgelu_bgrad_epilogue"] = c[2];
    d["dgelu_bgrad_general"] = c[3];
    return d;
  }, "How many fused forwards / linear_dgelu_bgrad calls took cuBLASLt's epilogue or the general path.");
  m.def("_reset_linear_gelu_paths", &tandem::ops::reset_path_counts);
  auto testing = m.def_submodule("_testing", "seams of the CPU tests (not a public API)");
  tandem::testing::bind(testing);
}
