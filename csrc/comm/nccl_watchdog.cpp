// Watchdog thread of one NCCL communicator; see nccl_watchdog.h.
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_watchdog.h"

namespace tandem::comm {

namespace {
constexpr auto kPollInterval = std::chrono::milliseconds(50);
}

NcclWatchdog::NcclWatchdog(std::shared_ptr<NcclState> state, int device)
    : state_(std::move(state)), device_(device), thread_([this] { run(); }) {}

NcclWatchdog::~NcclWatchdog() { stop(); }

void NcclWatchdog::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void NcclWatchdog::track(std::shared_ptr<CudaEvent> end, Clock::time_point deadline, std::string what) {
  std::lock_guard<std::mutex> lock(mu_);
  works_.push_back(Tracked{std::move(end), deadline, std::move(what)});
}

size_t NcclWatchdog::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return works_.size();
}

void NcclWatchdog::run() {
  if (device_ >= 0) {
    cudaSetDevice(device_);
    // This thread's event queries must not invalidate a CUDA graph that another thread
    // captures in the global mode: relaxed mode allows them during any capture.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
  }
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, kPollInterval, [this] { return stop_; });
    if (stop_) break;
    lock.unlock();
    poll();
    lock.lock();
  }
}

bool NcclWatchdog::drain(std::optional<Clock::time_point> until) {
  Backoff backoff(std::chrono::microseconds(0), std::chrono::microseconds(2000));
  while (true) {
    poll();
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      if (state_->failed_locked()) return false;
      if (state_->comm == nullptr) return true;  // closed or released: NCCL finished its work
    }
    if (pending() == 0) return true;
    if (until && Clock::now() > *until) return false;
    backoff.pause();
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
    if (state_->api->event_query(w.end->get()) == cudaSuccess) continue;  // done
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
    StateLock lock(*state_);  // an abort below happens after the unlock
    if (state_->comm != nullptr) {
      ncclResult_t status = ncclSuccess;
      if (state_->api->comm_get_async_error(state_->comm, &status) != ncclSuccess) status = ncclInternalError;
      if (status != ncclSuccess && status != ncclInProgress) {
        state_->fail_locked(state_->who + ": NCCL asynchronous error: " + ncclGetErrorString(status) + " (" +
                                state_->api->get_last_error(state_->comm) + ")",
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
