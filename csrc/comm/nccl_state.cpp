// NCCL status handling: checks, readiness polling with a deadline, abort on failure.
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_state.h"

#include <c10/cuda/CUDAException.h>

#include <thread>

#include "comm/errors.h"

namespace tandem::comm {

void NcclState::fail_locked(const std::string& message, bool is_timeout) {
  if (error.empty()) {
    error = message;
    timed_out = is_timeout;
  }
  if (comm != nullptr) {
    ncclCommAbort(comm);  // best effort: the error above is what the caller sees
    comm = nullptr;
  }
}

void NcclState::raise_if_failed_locked() const {
  if (error.empty()) return;
  if (timed_out) throw CommTimeout(error);
  throw CommError(error);
}

void nccl_check(ncclResult_t result, const std::string& what) {
  if (result == ncclSuccess || result == ncclInProgress) return;
  throw CommError(what + ": NCCL error: " + ncclGetErrorString(result) + " (" + ncclGetLastError(nullptr) + ")");
}

void nccl_wait_ready_locked(NcclState& state, const std::string& what, Clock::time_point deadline) {
  state.raise_if_failed_locked();
  ncclComm_t comm = state.comm;
  auto pause = std::chrono::microseconds(1);
  while (true) {
    ncclResult_t status = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm, &status);
    if (r != ncclSuccess) status = r;
    if (status == ncclSuccess) return;
    if (status != ncclInProgress) {
      const std::string message = what + ": NCCL error: " + ncclGetErrorString(status) + " (" +
                                  ncclGetLastError(comm) + ")";
      state.fail_locked(message, false);
      state.raise_if_failed_locked();
    }
    if (state.abort_requested) {
      state.fail_locked(state.who + ": the communicator was aborted (during " + what + ")", false);
      state.raise_if_failed_locked();
    }
    if (Clock::now() > deadline) {
      state.fail_locked(what + ": timed out waiting for NCCL", true);
      state.raise_if_failed_locked();
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

ncclDataType_t nccl_dtype(at::ScalarType t, const std::string& what) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kChar: return ncclInt8;
    case at::kByte: return ncclUint8;
    case at::kBool: return ncclUint8;
    default: TORCH_CHECK_TYPE(false, what, ": dtype ", t, " is not supported by NCCL");
  }
}

CudaEvent::CudaEvent() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }

CudaEvent::~CudaEvent() {
  if (event_ != nullptr) cudaEventDestroy(event_);  // never throws; CUDA defers a pending event
}

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
