#pragma once
// NcclCore: the host side of one NCCL communicator (non-blocking mode): creating it (init or
// split, never leaking a half-made comm), posting operations under its lock, its watchdog,
// and how it ends: close (collective finalize), release (drain, then destroy), abort
// (revoke, then abort, outside the lock). No CUDA stream, tensor or event is created here:
// NcclCommunicator adds those, and the CPU tests drive this class through a fake NcclApi.
#ifdef TANDEM_WITH_CUDA
#include <memory>
#include <optional>
#include <string>

#include "comm/errors.h"
#include "comm/nccl_watchdog.h"

namespace tandem::comm {

class NcclCore {
 public:
  // ncclCommInitRankConfig: collective over the group (every rank, the same unique_id bytes).
  static std::shared_ptr<NcclState> init_rank(const NcclApi& api, const std::string& unique_id, int rank, int size,
                                              double timeout_s);
  // ncclCommSplit(color 0, key rank): the same ranks, an independent communicator in the
  // parent's failure domain. Collective over the parent's group.
  static std::shared_ptr<NcclState> split(const std::shared_ptr<NcclState>& parent, int rank, double timeout_s);

  // device: the CUDA device of its events (-1: none, the fakes of the CPU tests).
  NcclCore(std::shared_ptr<NcclState> state, int device, double timeout_s);
  // release() without a timeout: in-flight operations finish (or reach their deadlines).
  ~NcclCore();
  NcclCore(const NcclCore&) = delete;
  NcclCore& operator=(const NcclCore&) = delete;

  // Under the lock: ncclGroupStart, body(comm), ncclGroupEnd, then the poll until NCCL
  // enqueued the group (non-blocking mode answers ncclInProgress first).
  template <class Body>
  void post(const std::string& what, Body&& body);
  // The end event of an operation just posted: watched until timeout_s from now.
  void track(const std::string& what, std::shared_ptr<CudaEvent> end);

  // Local and immediate: later calls raise; NCCL's abort runs outside the lock (revoke
  // first). Does not poison the failure domain.
  void abort();
  // Collective: ncclCommFinalize (waits for pending operations on every rank), then destroy.
  void close(double timeout_s);
  // Local end of a healthy communicator: waits (host) for its operations in flight (until
  // `timeout_s`, or else until their own deadlines), then ncclCommDestroy. Aborts instead
  // when they do not end in time or it (or its domain) failed. Idempotent.
  void release(std::optional<double> timeout_s);
  // Raises its error, its domain's poison, or a pending NCCL asynchronous error.
  void check();
  // Blocks the host until the last operation posted so far ended (at most timeout_s);
  // returns whether it did, or true once it failed (check() raises). Never raises.
  bool wait_idle(double timeout_s);

  const std::shared_ptr<NcclState>& state() const { return state_; }
  double timeout_s() const { return timeout_s_; }
  size_t pending() const { return watchdog_->pending(); }
  // How long post() spins before it sleeps (the host-cost benchmark compares 0 and 50 us).
  void set_spin(std::chrono::nanoseconds spin) { spin_ = spin; }

 private:
  std::shared_ptr<NcclState> state_;
  double timeout_s_;
  std::chrono::nanoseconds spin_ = Backoff::kDefaultSpin;
  std::unique_ptr<NcclWatchdog> watchdog_;
  std::mutex last_mu_;
  std::shared_ptr<CudaEvent> last_end_;  // operations of one comm stream end in order
};

template <class Body>
void NcclCore::post(const std::string& what, Body&& body) {
  StateLock lock(*state_);
  state_->raise_if_failed_locked();
  if (state_->comm == nullptr) throw CommError(what + ": the communicator was " + state_->ended);
  const NcclApi& api = *state_->api;
  nccl_check(api, api.group_start(), what);
  try {
    body(state_->comm);
  } catch (...) {
    api.group_end();  // close the group before the error leaves
    throw;
  }
  nccl_check(api, api.group_end(), what);
  nccl_wait_ready_locked(*state_, what, deadline_after(timeout_s_), spin_);
}

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
