#pragma once
// Pieces of the NCCL backend shared by the communicator, its Works and its watchdog:
// the ncclComm_t with its lock and first error, the failure domain it shares with its
// forks and its mesh, status checks, dtype mapping, events.
//
// Locking: `NcclState::mu` guards a state's fields and is held while NCCL is called to
// enqueue or poll, never while NCCL aborts, revokes or destroys (those can synchronise the
// communicator's streams, which can wait for the caller's stream: minutes behind a receive
// from a dead peer). A failure found under the lock takes the ncclComm_t out of the state;
// the StateLock in scope aborts it once the lock is released. Lock order: a state's `mu`,
// then its domain's.
#ifdef TANDEM_WITH_CUDA
#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "comm/backoff.h"
#include "comm/nccl_api.h"

namespace tandem::comm {

using Clock = std::chrono::steady_clock;

struct NcclState;

// The communicators whose failures concern each other: a communicator, its forks (a
// StageLink's), and the other communicators of its mesh (Communicator.share_failure_domain).
// A failure of one (an NCCL error, a watchdog timeout) poisons the domain: every later
// operation, wait and check of every member raises, naming the first failure. On CUDA a
// wait only orders streams, so a receive that the watchdog aborted lets its stream run on
// with an unfilled buffer; the poison makes the next host call raise instead of training
// on it. An explicit abort() or close() does not poison.
class FailureDomain {
 public:
  void join(const std::shared_ptr<NcclState>& member);
  // Records the first failure (later calls keep it).
  void poison(const std::string& reason, bool timed_out);
  // The first failure, or "" while healthy.
  std::string poisoned(bool* timed_out = nullptr) const;
  // The live members.
  std::vector<std::shared_ptr<NcclState>> members() const;
  // Moves every member of `other`'s domain into `into`'s (and its poison, if any).
  static void merge(const std::shared_ptr<NcclState>& into, const std::shared_ptr<NcclState>& other);

 private:
  mutable std::mutex mu_;
  std::string reason_;
  bool timed_out_ = false;
  std::vector<std::weak_ptr<NcclState>> members_;
};

// One NCCL communicator (non-blocking mode) and what happened to it. `mu` guards every
// field below it.
struct NcclState {
  NcclState(const NcclApi& api, std::string who);

  const NcclApi* const api;
  std::mutex mu;
  ncclComm_t comm = nullptr;
  std::string error;  // the first error (empty while healthy)
  bool timed_out = false;
  std::string who;             // "rank 1 of 4"
  std::string ended;           // "closed" / "released": the comm was destroyed in order
  std::shared_ptr<FailureDomain> domain;  // shared with forks and the mesh
  ncclComm_t doomed = nullptr;  // taken out by fail_locked: the StateLock aborts it
  // Set without the lock by abort() from any thread: a poll loop holding mu sees it and fails
  // at once, so abort() never waits for an enqueue that waits for NCCL.
  std::atomic<bool> abort_requested{false};

  // Under mu: records the first error and takes the comm out (`doomed`: the StateLock in
  // scope aborts it after unlocking; later calls raise). `poison`: a failure (not an
  // explicit abort) also poisons the failure domain.
  void fail_locked(const std::string& message, bool is_timeout, bool poison = true);
  // Under mu: raises the recorded error, the domain's poison, or that the comm ended.
  void raise_if_failed_locked() const;
  // Under mu: has it failed (itself or its domain)?
  bool failed_locked() const;
};

// Holds a state's lock; on unlock (or destruction), aborts the comm that fail_locked took
// out while it was held, outside the lock.
class StateLock {
 public:
  explicit StateLock(NcclState& state);
  ~StateLock();
  StateLock(const StateLock&) = delete;
  StateLock& operator=(const StateLock&) = delete;
  void unlock();  // idempotent

 private:
  NcclState& state_;
  std::unique_lock<std::mutex> lock_;
};

// Revokes every handle (NCCL sets their abort flags: in-flight kernels exit, and no stream
// of one waits for another's), then aborts each. Never called with a state lock held.
void revoke_then_abort(const std::vector<std::pair<const NcclApi*, ncclComm_t>>& handles);

// Aborts the communicators of `states` (local: never waits for a peer): every one is marked
// failed with `reason` (or keeps its earlier error), then revoked, then aborted. With
// `poison`, their domains are poisoned too.
void abort_states(const std::vector<std::shared_ptr<NcclState>>& states, const std::string& reason, bool poison);

// Throws CommError for any result other than success or "in progress".
void nccl_check(ncclResult_t result, const std::string& what);
void nccl_check(const NcclApi& api, ncclResult_t result, const std::string& what);
// Under a StateLock: polls ncclCommGetAsyncError until the comm's last call finished (a
// non-blocking communicator returns ncclInProgress first), yielding for the first `spin`
// then sleeping (Backoff); on an error, an abort() or past the deadline, fails the state
// (the lock's owner aborts the comm on unlock) and raises.
void nccl_wait_ready_locked(NcclState& state, const std::string& what, Clock::time_point deadline,
                            std::chrono::nanoseconds spin = Backoff::kDefaultSpin);

// Collectives: the NCCL type of a dtype (TypeError naming it when NCCL has none).
ncclDataType_t nccl_dtype(at::ScalarType t, const std::string& what);
// Point-to-point moves bytes and interprets nothing: every dtype travels as
// numel * element_size ncclUint8.
size_t nccl_p2p_bytes(at::ScalarType t, int64_t numel);

// A CUDA event (timing disabled), destroyed with its last owner; or a borrowed handle.
class CudaEvent {
 public:
  CudaEvent();
  // A handle this object does not own (the fake events of the CPU tests).
  static std::shared_ptr<CudaEvent> borrow(cudaEvent_t event);
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  struct Borrowed {};
  CudaEvent(cudaEvent_t event, Borrowed) : event_(event), owned_(false) {}
  cudaEvent_t event_ = nullptr;
  bool owned_ = true;
};

Clock::time_point deadline_after(double seconds);
std::string seconds_str(double s);  // "0.5 s"

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
