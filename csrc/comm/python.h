#pragma once
// pybind11 registration of the communication runtime (called from csrc/bindings.cpp).
#include <pybind11/pybind11.h>

namespace tandem::comm {
// Work, CommError, CommTimeoutError, _Communicator and its factories.
void bind(pybind11::module_& m);
}  // namespace tandem::comm

namespace tandem::overlap {
// _row_parallel_linear_forward, _column_parallel_backward.
void bind(pybind11::module_& m);
}  // namespace tandem::overlap

namespace tandem::p2p {
// _StageLink.
void bind(pybind11::module_& m);
}  // namespace tandem::p2p
