// NcclCore: see nccl_core.h.
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_core.h"

#include <c10/util/Exception.h>

#include <cstring>
#include <exception>

namespace tandem::comm {

namespace {

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // calls return at once; we poll with a deadline, so none can hang
  return config;
}

}  // namespace

std::shared_ptr<NcclState> NcclCore::init_rank(const NcclApi& api, const std::string& unique_id, int rank, int size,
                                               double timeout_s) {
  TORCH_CHECK_VALUE(unique_id.size() == sizeof(ncclUniqueId), "tandem.comm: an ncclUniqueId has ",
                    sizeof(ncclUniqueId), " bytes, got ", unique_id.size());
  TORCH_CHECK_VALUE(rank >= 0 && rank < size, "tandem.comm: rank ", rank, " is not in a group of size ", size);
  ncclUniqueId id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  auto state = std::make_shared<NcclState>(api, "rank " + std::to_string(rank) + " of " + std::to_string(size));
  state->domain->join(state);
  StateLock lock(*state);
  ncclConfig_t config = nonblocking_config();
  const std::string what = state->who + ": ncclCommInitRankConfig";
  const ncclResult_t r = api.comm_init_rank_config(&state->comm, size, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    // NCCL may have made the comm before it failed: the lock aborts it (never leaked)
    state->fail_locked(what + ": NCCL error: " + ncclGetErrorString(r) + " (" + api.get_last_error(nullptr) + ")",
                       false, false);
    state->raise_if_failed_locked();
  }
  nccl_wait_ready_locked(*state, what, deadline_after(timeout_s));
  return state;
}

std::shared_ptr<NcclState> NcclCore::split(const std::shared_ptr<NcclState>& parent, int rank, double timeout_s) {
  const NcclApi& api = *parent->api;
  auto child = std::make_shared<NcclState>(api, parent->who);
  const std::string what = parent->who + ": ncclCommSplit";
  ncclComm_t half_made = nullptr;
  std::exception_ptr failure;
  {
    StateLock lock(*parent);
    parent->raise_if_failed_locked();
    if (parent->comm == nullptr) throw CommError(parent->who + ": fork: the communicator was " + parent->ended);
    child->domain = parent->domain;
    ncclConfig_t config = nonblocking_config();
    try {
      // color 0, key = rank: the same ranks in the same order, an independent communicator
      nccl_check(api, api.comm_split(parent->comm, 0, rank, &child->comm, &config), what);
      nccl_wait_ready_locked(*parent, what, deadline_after(timeout_s));
    } catch (...) {  // the parent failed or refused: the half-made child goes too
      half_made = std::exchange(child->comm, nullptr);
      failure = std::current_exception();
    }
  }  // the parent's own abort, if its poll failed it, runs here
  if (failure) {
    if (half_made != nullptr) revoke_then_abort({{&api, half_made}});
    std::rethrow_exception(failure);
  }
  child->domain->join(child);
  StateLock lock(*child);
  nccl_wait_ready_locked(*child, what, deadline_after(timeout_s));
  return child;
}

NcclCore::NcclCore(std::shared_ptr<NcclState> state, int device, double timeout_s)
    : state_(std::move(state)), timeout_s_(timeout_s), watchdog_(std::make_unique<NcclWatchdog>(state_, device)) {}

NcclCore::~NcclCore() {
  try {
    release(std::nullopt);
  } catch (...) {  // a destructor reports nothing; the state keeps the error for the Works
  }
}

void NcclCore::track(const std::string& what, std::shared_ptr<CudaEvent> end) {
  {
    std::lock_guard<std::mutex> lock(last_mu_);
    last_end_ = end;
  }
  watchdog_->track(std::move(end), deadline_after(timeout_s_), what);
}

void NcclCore::abort() { abort_states({state_}, "the communicator was aborted", /*poison=*/false); }

void NcclCore::close(double timeout_s) {
  StateLock lock(*state_);
  if (state_->ended == "closed") return;
  state_->raise_if_failed_locked();  // an aborted or failed communicator says so
  if (state_->comm == nullptr) throw CommError(state_->who + ": close: the communicator was " + state_->ended);
  const NcclApi& api = *state_->api;
  const std::string what = state_->who + ": close (ncclCommFinalize)";
  // Finalize flushes this communicator's pending operations (which needs the peers), then
  // destroy frees it. Past the deadline the poll fails the state (the lock aborts the comm)
  // and raises CommTimeout. Works that completed stay good; new operations raise.
  nccl_check(api, api.comm_finalize(state_->comm), what);
  nccl_wait_ready_locked(*state_, what, deadline_after(timeout_s), spin_);
  ncclComm_t comm = std::exchange(state_->comm, nullptr);
  state_->ended = "closed";
  lock.unlock();
  (void)api.comm_destroy(comm);
}

void NcclCore::release(std::optional<double> timeout_s) {
  watchdog_->stop();
  std::optional<Clock::time_point> until;
  if (timeout_s) until = deadline_after(*timeout_s);
  const bool drained = watchdog_->drain(until);
  StateLock lock(*state_);
  if (state_->comm == nullptr) return;  // ended, or failed (and aborted)
  if (!drained) {  // the lock aborts it: its operations are cancelled
    if (state_->failed_locked()) {
      state_->fail_locked(state_->who + ": released after a failure of its group", false);
    } else {
      state_->fail_locked(state_->who + ": release: " + std::to_string(watchdog_->pending()) +
                              " operation(s) still in flight after " + seconds_str(*timeout_s) + "; aborted",
                          true);
    }
    return;
  }
  ncclComm_t comm = std::exchange(state_->comm, nullptr);
  state_->ended = "released";
  lock.unlock();
  (void)state_->api->comm_destroy(comm);  // its operations ended: nothing is cancelled
}

void NcclCore::check() {
  StateLock lock(*state_);
  state_->raise_if_failed_locked();
  if (state_->comm == nullptr) return;
  ncclResult_t status = ncclSuccess;
  if (state_->api->comm_get_async_error(state_->comm, &status) != ncclSuccess) status = ncclInternalError;
  if (status != ncclSuccess && status != ncclInProgress) {
    state_->fail_locked(state_->who + ": NCCL asynchronous error: " + ncclGetErrorString(status), false);
    state_->raise_if_failed_locked();
  }
}

bool NcclCore::wait_idle(double timeout_s) {
  std::shared_ptr<CudaEvent> end;
  {
    std::lock_guard<std::mutex> lock(last_mu_);
    end = last_end_;
  }
  if (!end) return true;
  const auto deadline = deadline_after(timeout_s);
  Backoff backoff(Backoff::kDefaultSpin, std::chrono::microseconds(500));
  while (true) {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      if (state_->failed_locked()) return true;
    }
    const cudaError_t status = state_->api->event_query(end->get());
    if (status == cudaSuccess) return true;
    if (status != cudaErrorNotReady) return true;  // a CUDA error: check() and the next call report it
    if (Clock::now() >= deadline) return false;
    backoff.pause();
  }
}

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
