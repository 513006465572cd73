// NCCL status handling: the failure domain, checks, readiness polling with a deadline,
// aborts outside the state lock.
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_state.h"

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdio>
#include <utility>

#include "comm/errors.h"

namespace tandem::comm {

// --- FailureDomain -----------------------------------------------------------------------------

void FailureDomain::join(const std::shared_ptr<NcclState>& member) {
  std::lock_guard<std::mutex> lock(mu_);
  members_.erase(std::remove_if(members_.begin(), members_.end(), [](const auto& w) { return w.expired(); }),
                 members_.end());
  members_.push_back(member);
}

void FailureDomain::poison(const std::string& reason, bool timed_out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!reason_.empty()) return;
  reason_ = reason;
  timed_out_ = timed_out;
}

std::string FailureDomain::poisoned(bool* timed_out) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (timed_out) *timed_out = timed_out_;
  return reason_;
}

std::vector<std::shared_ptr<NcclState>> FailureDomain::members() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<NcclState>> out;
  for (const auto& w : members_)
    if (auto s = w.lock()) out.push_back(std::move(s));
  return out;
}

void FailureDomain::merge(const std::shared_ptr<NcclState>& into, const std::shared_ptr<NcclState>& other) {
  std::shared_ptr<FailureDomain> target, source;
  {
    std::lock_guard<std::mutex> lock(into->mu);
    target = into->domain;
  }
  {
    std::lock_guard<std::mutex> lock(other->mu);
    source = other->domain;
  }
  if (target == source) return;
  bool timed_out = false;
  const std::string reason = source->poisoned(&timed_out);
  if (!reason.empty()) target->poison(reason, timed_out);
  for (const auto& member : source->members()) {  // no domain lock held while a state's is taken
    {
      std::lock_guard<std::mutex> lock(member->mu);
      member->domain = target;
    }
    target->join(member);
  }
}

// --- NcclState ---------------------------------------------------------------------------------

NcclState::NcclState(const NcclApi& api_, std::string who_)
    : api(&api_), who(std::move(who_)), domain(std::make_shared<FailureDomain>()) {}

void NcclState::fail_locked(const std::string& message, bool is_timeout, bool poison) {
  if (error.empty()) {
    error = message;
    timed_out = is_timeout;
  }
  if (poison) domain->poison(error, timed_out);
  if (comm != nullptr) {  // aborted by the StateLock once the lock is released
    doomed = comm;
    comm = nullptr;
  }
}

void NcclState::raise_if_failed_locked() const {
  if (!error.empty()) {
    if (timed_out) throw CommTimeout(error);
    throw CommError(error);
  }
  const std::string reason = domain->poisoned();
  if (!reason.empty()) throw CommError(who + ": a communicator of this group failed before: " + reason);
}

bool NcclState::failed_locked() const { return !error.empty() || !domain->poisoned().empty(); }

// --- aborting outside the lock -------------------------------------------------------------------

StateLock::StateLock(NcclState& state) : state_(state), lock_(state.mu) {}

StateLock::~StateLock() { unlock(); }

void StateLock::unlock() {
  if (!lock_.owns_lock()) return;
  ncclComm_t doomed = std::exchange(state_.doomed, nullptr);
  lock_.unlock();
  if (doomed != nullptr) revoke_then_abort({{state_.api, doomed}});
}

void revoke_then_abort(const std::vector<std::pair<const NcclApi*, ncclComm_t>>& handles) {
  // ncclCommAbort makes NCCL's group blocking and synchronises the comm's streams; a
  // stream that waits (through the caller's stream) for a kernel of another communicator
  // would hold it until that kernel ends. Revoking all first stops every kernel of them.
  // Both are best effort: the error already recorded is what callers see.
  // flags 0: NCCL_REVOKE_DEFAULT, a macro that headers before NCCL 2.28.7 lack
  for (const auto& [api, comm] : handles) (void)api->comm_revoke(comm, 0);
  for (const auto& [api, comm] : handles) (void)api->comm_abort(comm);
}

void abort_states(const std::vector<std::shared_ptr<NcclState>>& states, const std::string& reason, bool poison) {
  for (const auto& s : states) s->abort_requested = true;  // a poll holding a lock gives up now
  std::vector<std::pair<const NcclApi*, ncclComm_t>> handles;
  for (const auto& s : states) {
    std::lock_guard<std::mutex> lock(s->mu);  // not a StateLock: the aborts wait for all revokes
    if (s->comm == nullptr && s->doomed == nullptr) continue;  // ended, or another caller aborts it
    s->fail_locked(s->who + ": " + reason, false, poison);
    if (s->doomed != nullptr) handles.emplace_back(s->api, std::exchange(s->doomed, nullptr));
  }
  revoke_then_abort(handles);
}

// --- checks and polling ----------------------------------------------------------------------------

void nccl_check(ncclResult_t result, const std::string& what) {
  if (result == ncclSuccess || result == ncclInProgress) return;
  throw CommError(what + ": NCCL error: " + ncclGetErrorString(result) + " (" + ncclGetLastError(nullptr) + ")");
}

void nccl_check(const NcclApi& api, ncclResult_t result, const std::string& what) {
  if (result == ncclSuccess || result == ncclInProgress) return;
  throw CommError(what + ": NCCL error: " + ncclGetErrorString(result) + " (" + api.get_last_error(nullptr) + ")");
}

void nccl_wait_ready_locked(NcclState& state, const std::string& what, Clock::time_point deadline,
                            std::chrono::nanoseconds spin) {
  state.raise_if_failed_locked();
  if (state.comm == nullptr) throw CommError(what + ": the communicator was " + state.ended);
  ncclComm_t comm = state.comm;
  Backoff backoff(spin);
  while (true) {
    ncclResult_t status = ncclSuccess;
    ncclResult_t r = state.api->comm_get_async_error(comm, &status);
    if (r != ncclSuccess) status = r;
    if (status == ncclSuccess) return;
    if (status != ncclInProgress) {
      state.fail_locked(what + ": NCCL error: " + ncclGetErrorString(status) + " (" +
                            state.api->get_last_error(comm) + ")",
                        false);
      state.raise_if_failed_locked();
    }
    if (state.abort_requested) {
      state.fail_locked(state.who + ": the communicator was aborted (during " + what + ")", false, false);
      state.raise_if_failed_locked();
    }
    if (Clock::now() > deadline) {
      state.fail_locked(what + ": timed out waiting for NCCL", true);
      state.raise_if_failed_locked();
    }
    backoff.pause();
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
    default:
      TORCH_CHECK_TYPE(false, what, ": dtype ", t,
                       " has no NCCL reduction type (collectives take float32, float64, float16, bfloat16, "
                       "int64, int32, int8, uint8 and bool)");
  }
}

size_t nccl_p2p_bytes(at::ScalarType t, int64_t numel) {
  return static_cast<size_t>(numel) * c10::elementSize(t);
}

// --- events and time -------------------------------------------------------------------------------

CudaEvent::CudaEvent() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }

std::shared_ptr<CudaEvent> CudaEvent::borrow(cudaEvent_t event) {
  return std::shared_ptr<CudaEvent>(new CudaEvent(event, Borrowed{}));
}

CudaEvent::~CudaEvent() {
  if (owned_ && event_ != nullptr) cudaEventDestroy(event_);  // never throws; CUDA defers a pending event
}

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

std::string seconds_str(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g s", s);
  return buf;
}

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
