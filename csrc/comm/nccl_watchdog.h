#pragma once
// The NCCL backend's watchdog: a thread that watches the end events of in-flight
// operations, polls ncclCommGetAsyncError, and aborts the communicator when an operation
// outlives its timeout (or NCCL reports an error), poisoning its failure domain, so no GPU
// wait hangs forever and no later host call goes on as if nothing happened. It holds no
// tensors (their memory is protected by recordStream): releasing a tensor can take the
// GIL, and the communicator's destructor joins this thread while holding it.
#ifdef TANDEM_WITH_CUDA
#include <condition_variable>
#include <optional>
#include <thread>
#include <vector>

#include "comm/nccl_state.h"

namespace tandem::comm {

class NcclWatchdog {
 public:
  // device: the CUDA device its thread queries events on (-1: none, the CPU tests' fakes).
  NcclWatchdog(std::shared_ptr<NcclState> state, int device);
  ~NcclWatchdog();  // stops and joins the thread
  NcclWatchdog(const NcclWatchdog&) = delete;
  NcclWatchdog& operator=(const NcclWatchdog&) = delete;

  void track(std::shared_ptr<CudaEvent> end, Clock::time_point deadline, std::string what);
  // Stops and joins the thread (idempotent); tracked operations stay tracked.
  void stop();
  // After stop(): polls in the calling thread until every tracked operation ended (true), the
  // state failed (an operation outlived its deadline or NCCL reported an error: the state is
  // failed and the comm aborted; false), or `until` passed (false, nothing failed by it).
  bool drain(std::optional<Clock::time_point> until);
  size_t pending() const;

 private:
  void run();
  // One look: drops ended operations; fails the state on an NCCL error or an expired one.
  void poll();

  std::shared_ptr<NcclState> state_;
  int device_;
  mutable std::mutex mu_;  // guards works_ and stop_
  std::condition_variable cv_;
  bool stop_ = false;
  struct Tracked {
    std::shared_ptr<CudaEvent> end;
    Clock::time_point deadline;
    std::string what;
  };
  std::vector<Tracked> works_;
  std::thread thread_;
};

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
