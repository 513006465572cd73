// pybind11 face of the overlap ops (autograd lives in tandem.comm). GIL released.
#include <torch/extension.h>

#include "comm/python.h"
#include "overlap/column_parallel.h"
#include "overlap/row_parallel.h"

namespace py = pybind11;

namespace tandem::overlap {

void bind(py::module_& m) {
  using Release = py::call_guard<py::gil_scoped_release>;
  m.def("_row_parallel_linear_forward", &row_parallel_linear_forward, py::arg("input"), py::arg("weight"),
        py::arg("bias"), py::arg("comm"), py::arg("chunks"), Release());
  m.def("_column_parallel_backward", &column_parallel_backward, py::arg("grad_output"), py::arg("input"),
        py::arg("weight"), py::arg("comm"), py::arg("weight_grad"), py::arg("bias_grad"), Release());
  m.def("_chunk_sizes", &chunk_sizes, py::arg("rows"), py::arg("chunks"));
}

}  // namespace tandem::overlap
