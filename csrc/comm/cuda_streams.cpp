// StreamLease: see cuda_streams.h.
#ifdef TANDEM_WITH_CUDA
#include "comm/cuda_streams.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <mutex>
#include <vector>

#include "comm/errors.h"

namespace tandem::comm {

void require_not_capturing(cudaStream_t stream, const std::string& what) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t r = cudaStreamIsCapturing(stream, &status);
  if (r == cudaErrorStreamCaptureImplicit) {  // the legacy stream while another one captures
    (void)cudaGetLastError();
    status = cudaStreamCaptureStatusActive;
  } else {
    C10_CUDA_CHECK(r);
  }
  if (status != cudaStreamCaptureStatusNone)
    throw CommError(what + ": the stream is capturing a CUDA graph; tandem's NCCL operations cannot be "
                    "captured (the host watches their completion and deadlines): run them outside the graph");
}

namespace {

std::mutex g_mu;
std::map<c10::DeviceIndex, std::vector<cudaStream_t>>& free_streams() {
  static auto* streams = new std::map<c10::DeviceIndex, std::vector<cudaStream_t>>();  // never freed
  return *streams;
}

}  // namespace

StreamLease::StreamLease(c10::DeviceIndex device) : device_(device) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto& pool = free_streams()[device];
    if (!pool.empty()) {
      raw_ = pool.back();
      pool.pop_back();
      return;
    }
  }
  c10::cuda::CUDAGuard guard(device);
  int least = 0, greatest = 0;
  C10_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  C10_CUDA_CHECK(cudaStreamCreateWithPriority(&raw_, cudaStreamNonBlocking, greatest));
}

StreamLease::~StreamLease() {
  std::lock_guard<std::mutex> lock(g_mu);
  free_streams()[device_].push_back(raw_);
}

c10::cuda::CUDAStream StreamLease::stream() const { return c10::cuda::getStreamFromExternal(raw_, device_); }

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
