#pragma once
// Pieces of the NCCL backend shared by the communicator, its Works and its watchdog:
// the ncclComm_t with its lock and first error, status checks, dtype mapping, events.
#ifdef TANDEM_WITH_CUDA
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>

namespace tandem::comm {

using Clock = std::chrono::steady_clock;

// One NCCL communicator (non-blocking mode) and what happened to it. `mu` guards every
// field: enqueueing, polling, aborting and destroying never race.
struct NcclState {
  ncclComm_t comm = nullptr;
  std::mutex mu;
  std::string error;  // the first error (empty while healthy)
  bool timed_out = false;
  std::string who;  // "rank 1 of 4"
  bool closed = false;  // close() finalized and destroyed comm: new operations raise
  // Set without the lock by abort() from any thread: a poll loop holding mu sees it and fails
  // at once, so abort() never waits for an enqueue that waits for NCCL.
  std::atomic<bool> abort_requested{false};

  // Under mu: records the first error and aborts the communicator (pending GPU work is
  // cancelled, later calls raise).
  void fail_locked(const std::string& message, bool is_timeout);
  // Under mu: raises the recorded error, if any.
  void raise_if_failed_locked() const;
};

// Throws CommError for any result other than success or "in progress".
void nccl_check(ncclResult_t result, const std::string& what);
// Under state.mu: polls ncclCommGetAsyncError on state.comm until its last call finished (a
// non-blocking communicator returns ncclInProgress first); on an error or past the deadline,
// fails the state (aborting the communicator) and raises.
void nccl_wait_ready_locked(NcclState& state, const std::string& what, Clock::time_point deadline);

ncclDataType_t nccl_dtype(at::ScalarType t, const std::string& what);

// A CUDA event (timing disabled) destroyed with its last owner.
class CudaEvent {
 public:
  CudaEvent();
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

Clock::time_point deadline_after(double seconds);

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
