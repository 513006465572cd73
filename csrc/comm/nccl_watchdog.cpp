// Watchdog thread of one NCCL communicator; see nccl_watchdog.h.
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_watchdog.h"

#include <cstdio>

namespace tandem::comm {

namespace {
constexpr auto kPollInterval = std::chrono::milliseconds(50);
}

NcclWatchdog::NcclWatchdog(std::shared_ptr<NcclState> state, c10::DeviceIndex device)
    : state_(std::move(state)), device_(device), thread_([this] { run(); }) {}

NcclWatchdog::~NcclWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void NcclWatchdog::track(const NcclWork& work) {
  std::lock_guard<std::mutex> lock(mu_);
  works_.push_back(Tracked{work.end_event(), work.deadline(), work.what()});
}

void NcclWatchdog::run() {
  cudaSetDevice(device_);
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, kPollInterval, [this] { return stop_; });
    if (stop_) break;
    lock.unlock();
    poll();
    lock.lock();
  }
}

void NcclWatchdog::poll() {
  std::vector<Tracked> pending;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending.swap(works_);
  }
  const auto now = Clock::now();
  const Tracked* expired = nullptr;
  std::vector<Tracked> still;
  still.reserve(pending.size());
  for (auto& w : pending) {
    if (cudaEventQuery(w.end->get()) == cudaSuccess) continue;  // done
    still.push_back(std::move(w));
  }
  for (const auto& w : still) {
    if (now > w.deadline) {
      expired = &w;
      break;
    }
  }
  bool failed = false;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->comm != nullptr) {
      ncclResult_t status = ncclSuccess;
      if (ncclCommGetAsyncError(state_->comm, &status) != ncclSuccess) status = ncclInternalError;
      if (status != ncclSuccess && status != ncclInProgress) {
        state_->fail_locked(state_->who + ": NCCL asynchronous error: " + ncclGetErrorString(status) + " (" +
                                ncclGetLastError(state_->comm) + ")",
                            false);
      } else if (expired) {
        state_->fail_locked(expired->what + ": timed out (the watchdog aborted the communicator)", true);
      }
    }
    failed = !state_->error.empty();
  }
  if (failed) return;  // aborted: nothing will complete; drop the works
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& w : still) works_.push_back(std::move(w));
}

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
