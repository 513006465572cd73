#pragma once
// Communicator: one interface over a group of ranks, two backends (c10d for any
// torch.distributed ProcessGroup, e.g. gloo on CPU; NCCL with its own communicator and
// comm streams on CUDA). The public methods check their arguments and describe the
// operation; the backends implement the do_* hooks.
#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/work.h"

namespace tandem::comm {

struct NcclState;  // comm/nccl_state.h (CUDA builds)

enum class ReduceOp { kSum, kProduct, kMax, kMin };

// "sum" | "prod" | "product" | "max" | "min"
ReduceOp parse_reduce_op(const std::string& name);
const char* reduce_op_name(ReduceOp op);

enum class P2PKind { kSend, kRecv };

struct P2POp {
  P2PKind kind;
  at::Tensor tensor;
  int peer;  // a rank in the communicator's group
  // A receive into memory from empty_for_recv() that nothing has used yet: it need not wait
  // for the work queued on the caller's stream (NCCL), so a receive posted early lands
  // while that work runs. Only when every op of a batch is fresh.
  bool fresh = false;
};

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  Communicator(int rank, int size, at::Device device, double timeout_s);
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  at::Device device() const { return device_; }
  double timeout_s() const { return timeout_s_; }
  virtual std::string backend() const = 0;  // "nccl" or "c10d:<pg backend>"
  // "rank 1 of 4" (the prefix of every message about this communicator)
  std::string who() const;

  // t [n...] summed (or op-reduced) over ranks, in place.
  WorkPtr all_reduce(const at::Tensor& t, ReduceOp op);
  // in [n0, ...] from every rank -> out [size * n0, ...], rank r's block at rows r*n0.
  WorkPtr all_gather(const at::Tensor& out, const at::Tensor& in);
  // in [size * n0, ...] reduced over ranks; rank r keeps rows [r*n0, (r+1)*n0) -> out [n0, ...].
  WorkPtr reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op);
  WorkPtr send(const at::Tensor& t, int dst);
  WorkPtr recv(const at::Tensor& t, int src);
  // Sends and receives issued together (NCCL: one group; c10d: posted in list order, recvs
  // first). One Work per op, in order. A send to this rank pairs with a recv from it.
  std::vector<WorkPtr> batch_p2p(const std::vector<P2POp>& ops);

  // A communicator over the same ranks whose operations are ordered independently of this
  // one's (NCCL: ncclCommSplit and its own stream; c10d: its own p2p tag). Collective: every
  // rank of the group calls fork() in the same order. timeout_s: the fork's default timeout
  // (nullopt: this communicator's).
  virtual std::shared_ptr<Communicator> fork(std::optional<double> timeout_s) = 0;
  // Tears the communicator down; pending and later operations raise CommError.
  virtual void abort() = 0;
  // An orderly end (NCCL: finalize, which waits for this communicator's pending operations
  // on every rank, then destroy); later operations raise CommError. Collective: every rank
  // closes. Past timeout_s the communicator is aborted and CommTimeout raised. Without
  // close() the destructor releases it (local: drains, then destroys; see release()).
  virtual void close(std::optional<double> timeout_s) { abort(); }
  // A local end (NCCL: waits on the host for the operations in flight, until timeout_s or
  // else their own deadlines, then ncclCommDestroy; aborts instead when they do not end in
  // time or the communicator failed). Later operations raise. c10d: close().
  virtual void release(std::optional<double> timeout_s) { close(timeout_s); }
  // Raises the pending asynchronous error (NCCL watchdog), if any, or the failure of a
  // communicator sharing its failure domain (NCCL).
  virtual void check() {}
  // Blocks the host until every operation posted so far ended (at most timeout_s); returns
  // whether they did (true once the communicator failed: check() raises). Never raises.
  // c10d: true (its waits already are host waits).
  virtual bool wait_idle(double timeout_s) { return true; }
  // wait_idle(timeout_s), then check(): the operations posted so far completed without a
  // failure, here or in the communicator's failure domain, or this raises
  // (CommTimeoutError when they are still in flight after timeout_s).
  void synchronize(std::optional<double> timeout_s);
  // The NCCL communicator's state (abort_all, failure domains); nullptr for other backends.
  virtual std::shared_ptr<NcclState> nccl_state() const { return nullptr; }
  // Memory for a receive that may skip waiting for the caller's stream (P2POp::fresh).
  // NCCL: allocated on the comm stream; whoever reads it on another stream calls
  // record_stream after waiting for the receive (StageLink does). Others: at::empty.
  virtual at::Tensor empty_for_recv(at::IntArrayRef shape, at::ScalarType dtype) {
    return at::empty(shape, at::TensorOptions().dtype(dtype).device(device()));
  }

 protected:
  virtual WorkPtr do_all_reduce(const at::Tensor& t, ReduceOp op, std::string what) = 0;
  virtual WorkPtr do_all_gather(const at::Tensor& out, const at::Tensor& in, std::string what) = 0;
  virtual WorkPtr do_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op,
                                    std::string what) = 0;
  // ops are checked; whats[i] describes ops[i]. Returns one Work per op.
  virtual std::vector<WorkPtr> do_batch_p2p(const std::vector<P2POp>& ops,
                                            const std::vector<std::string>& whats) = 0;

  // "rank 1 of 4: send of float32[4, 8] to rank 2"
  std::string describe(const std::string& op, const at::Tensor& t, int peer = -1,
                       const char* preposition = "") const;
  void check_tensor(const char* op, const at::Tensor& t) const;
  void check_peer(const char* op, int peer) const;

 private:
  int rank_;
  int size_;
  at::Device device_;
  double timeout_s_;
};

using CommunicatorPtr = std::shared_ptr<Communicator>;

// Aborts `comms` (local: never waits for a peer): NCCL communicators are all revoked first
// (their kernels exit, so no stream of one waits for another's), then aborted. With
// `failure_domains`, also every NCCL communicator sharing a failure domain with one of them
// (a mesh's communicators and their forks). Later operations on them raise CommError.
void abort_all(const std::vector<CommunicatorPtr>& comms, bool failure_domains);
// Makes `other` (and every communicator of its failure domain) share `comm`'s failure
// domain: a failure of one poisons all. NCCL communicators only; others are left alone.
void share_failure_domain(const CommunicatorPtr& comm, const CommunicatorPtr& other);

// "float32[4, 8]"
std::string tensor_signature(const at::Tensor& t);
std::string tensor_signature(at::ScalarType dtype, at::IntArrayRef shape);

}  // namespace tandem::comm
