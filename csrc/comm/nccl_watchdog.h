#pragma once
// The NCCL backend's watchdog: a thread that watches the end events of in-flight
// operations, polls ncclCommGetAsyncError, and aborts the communicator when an operation
// outlives its timeout, so no GPU wait hangs forever. It holds no tensors (their memory is
// protected by recordStream): releasing a tensor can take the GIL, and the communicator's
// destructor joins this thread while holding it.
#ifdef TANDEM_WITH_CUDA
#include <condition_variable>
#include <thread>
#include <vector>

#include "comm/nccl_work.h"

namespace tandem::comm {

class NcclWatchdog {
 public:
  NcclWatchdog(std::shared_ptr<NcclState> state, c10::DeviceIndex device);
  ~NcclWatchdog();  // stops and joins the thread
  NcclWatchdog(const NcclWatchdog&) = delete;
  NcclWatchdog& operator=(const NcclWatchdog&) = delete;

  void track(const NcclWork& work);

 private:
  void run();
  void poll();

  std::shared_ptr<NcclState> state_;
  c10::DeviceIndex device_;
  std::mutex mu_;  // guards works_ and stop_
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
