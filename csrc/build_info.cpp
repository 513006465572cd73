// What this core was compiled with, for tandem.build_info() and `tandem info`.
#include "build_info.h"

#include <string>

#include <torch/version.h>

#ifdef TANDEM_WITH_CUDA
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include "comm/nccl_api.h"
#endif

namespace tandem {

namespace {
std::string dotted(int major, int minor, int patch) {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}
}  // namespace

pybind11::dict build_info() {
  pybind11::dict d;
  d["torch_version"] = std::string(TORCH_VERSION);
#ifdef TANDEM_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(TANDEM_CUDA_ARCHS);
  d["cuda_version"] = dotted(CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10, 0);
  d["cublaslt_version"] = dotted(CUBLAS_VER_MAJOR, CUBLAS_VER_MINOR, CUBLAS_VER_PATCH);
  d["nccl_version"] = dotted(NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH);
  int nccl_runtime = 0;
  if (ncclGetVersion(&nccl_runtime) == ncclSuccess) {
    // NCCL_VERSION(X,Y,Z) = X*10000 + Y*100 + Z since 2.9
    d["nccl_runtime_version"] = dotted(nccl_runtime / 10000, (nccl_runtime % 10000) / 100, nccl_runtime % 100);
  }
  d["nccl_revoke"] = comm::nccl_has_revoke();  // abort_all revokes first (NCCL >= 2.28.7)
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_version"] = pybind11::none();
  d["cublaslt_version"] = pybind11::none();
  d["nccl_version"] = pybind11::none();
  d["nccl_revoke"] = false;
#endif
  return d;
}

}  // namespace tandem
