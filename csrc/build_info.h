#pragma once
#include <pybind11/pybind11.h>

namespace tandem {
// {"cuda": bool, "cuda_archs": str, "cuda_version": str, "nccl_version": str, ...}
pybind11::dict build_info();
}  // namespace tandem
