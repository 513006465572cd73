#pragma once
// A scripted NCCL for CPU tests of the NCCL backend's host logic (NcclCore, the watchdog,
// NcclWork, abort_all): an NcclApi whose communicators and events are host objects.
//
// It reproduces what that logic depends on in NCCL 2.30.7 (src/init.cc, src/group.cc):
//  - non-blocking mode: init, split and finalize answer ncclInProgress until ready; a group
//    end starts a thread that "launches" the group and answers ncclInProgress until it ran
//    (2.30.7 starts one thread per non-blocking group);
//  - ncclCommRevoke sets the abort flags (kernels exit) and returns at once;
//  - ncclCommAbort sets the abort flags, then synchronises the comm's streams: a comm whose
//    stream waits (through the caller's stream) for another comm's kernel blocks until
//    that kernel ends (here: until the other comm is revoked or aborted, or a cap passes);
//  - an operation's end event fires when it completed or when its comm's abort flag is set.
// A "held" comm is one whose peer does not answer: its operations never complete.
#ifdef TANDEM_WITH_CUDA
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/nccl_core.h"

namespace tandem::comm::fake {

struct Script {
  ncclResult_t init_result = ncclInProgress;  // what ncclCommInitRankConfig returns
  bool init_makes_comm = true;                // whether it stores a comm before returning
  ncclResult_t split_error = ncclSuccess;     // what a split's async job leaves on the parent
  double ready_after_us = 0;                  // init / split / finalize: in progress this long
  double launch_us = 0;                       // a group's launch takes this long
  bool launch_thread = true;                  // on a thread per group (as NCCL), or just a delay
  double abort_block_limit_s = 5;             // the most an abort waits for another comm's kernel
};

const NcclApi& api();
// Forgets every fake comm and event, the call log, and sets the script.
void reset(const Script& script);
// (comm id, call) in order: "init", "split", "revoke", "abort", "destroy", "finalize", "group".
std::vector<std::pair<int, std::string>> calls();

// Per fake comm (by its ncclComm_t): the test's levers.
int id_of(ncclComm_t comm);
void set_hold(ncclComm_t comm, bool hold);  // held: its operations do not complete
void set_waits_on(ncclComm_t comm, ncclComm_t other);  // its streams wait for other's kernels
void set_async_error(ncclComm_t comm, ncclResult_t error);
double abort_blocked_s(ncclComm_t comm);  // how long its abort waited for another comm

// A Communicator (CPU tensors, device -1) on the fake NCCL: the real front (argument
// checks), NcclCore and NcclWork.
class FakeCommunicator final : public Communicator {
 public:
  FakeCommunicator(const std::string& unique_id, int rank, int size, double timeout_s);
  std::string backend() const override { return "nccl-fake"; }
  CommunicatorPtr fork(std::optional<double> timeout_s) override;
  void abort() override { core_.abort(); }
  void close(std::optional<double> timeout_s) override { core_.close(timeout_s.value_or(timeout_s_)); }
  void release(std::optional<double> timeout_s) override { core_.release(timeout_s); }
  void check() override { core_.check(); }
  bool wait_idle(double timeout_s) override { return core_.wait_idle(timeout_s); }
  std::shared_ptr<NcclState> nccl_state() const override { return core_.state(); }
  // The fake comm it was made with (kept after it ended: the tests' levers act on it).
  ncclComm_t handle() const { return handle_; }
  NcclCore& core() { return core_; }

 protected:
  WorkPtr do_all_reduce(const at::Tensor& t, ReduceOp op, std::string what) override;
  WorkPtr do_all_gather(const at::Tensor& out, const at::Tensor& in, std::string what) override;
  WorkPtr do_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op, std::string what) override;
  std::vector<WorkPtr> do_batch_p2p(const std::vector<P2POp>& ops, const std::vector<std::string>& whats) override;

 private:
  FakeCommunicator(std::shared_ptr<NcclState> state, int rank, int size, double timeout_s);
  std::vector<WorkPtr> post(const std::string& what, std::vector<at::Tensor> tensors, size_t works);

  double timeout_s_;
  ncclComm_t handle_;
  NcclCore core_;
};

// Median host time (microseconds) of one all-reduce post on a fake communicator: the state
// lock, ncclGroupStart, the call, ncclGroupEnd and the readiness poll, with the group's
// launch taking `launch_us` (on a thread per group, as NCCL 2.30.7, with `launch_thread`)
// and the poll spinning `spin_us` before it sleeps.
double bench_post(int posts, double launch_us, bool launch_thread, double spin_us);

}  // namespace tandem::comm::fake
#endif  // TANDEM_WITH_CUDA
