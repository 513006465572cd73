#pragma once
// The NCCL backend: tandem's own ncclComm_t (non-blocking mode) and its own high-priority
// comm stream (lent from tandem's own streams, not torch's shared pool, so no other
// library's kernels queue behind its collectives). Ordering between the caller's current
// stream and the comm stream uses CUDA events only: no host synchronisation, no reliance on
// CUDA_DEVICE_MAX_CONNECTIONS. The host side (creation, posting, watchdog, ends) is NcclCore.
#ifdef TANDEM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "comm/communicator.h"
#include "comm/cuda_streams.h"
#include "comm/nccl_core.h"

namespace tandem::comm {

// A fresh ncclUniqueId as bytes (rank 0 makes it; the group broadcasts it).
std::string nccl_unique_id();

class NcclCommunicator final : public Communicator {
 public:
  // Collective over the group: every rank calls it with the same unique_id.
  static std::shared_ptr<NcclCommunicator> create(const std::string& unique_id, int rank, int size,
                                                   int device_index, double timeout_s);
  // Releases (drains, then destroys) a healthy communicator; see NcclCore::release. Dropped
  // from Python, this runs with the GIL held: with operations still in flight it waits for
  // them (at most until their deadlines) before other Python threads run. Call release()
  // (which releases the GIL) first where that matters.
  ~NcclCommunicator() override = default;

  std::string backend() const override { return "nccl"; }
  // ncclCommSplit (same ranks) with its own comm stream, in this one's failure domain.
  CommunicatorPtr fork(std::optional<double> timeout_s) override;
  void abort() override { core_.abort(); }
  void close(std::optional<double> timeout_s) override;
  void release(std::optional<double> timeout_s) override { core_.release(timeout_s); }
  void check() override { core_.check(); }
  bool wait_idle(double timeout_s) override { return core_.wait_idle(timeout_s); }
  c10::cuda::CUDAStream stream() const { return stream_; }
  at::Tensor empty_for_recv(at::IntArrayRef shape, at::ScalarType dtype) override;
  std::shared_ptr<NcclState> nccl_state() const override { return core_.state(); }

 protected:
  WorkPtr do_all_reduce(const at::Tensor& t, ReduceOp op, std::string what) override;
  WorkPtr do_all_gather(const at::Tensor& out, const at::Tensor& in, std::string what) override;
  WorkPtr do_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op, std::string what) override;
  std::vector<WorkPtr> do_batch_p2p(const std::vector<P2POp>& ops, const std::vector<std::string>& whats) override;

 private:
  NcclCommunicator(std::shared_ptr<NcclState> state, int rank, int size, int device_index, double timeout_s);

  // Runs `body(comm, stream)` (NCCL calls inside one group) on the comm stream, after the
  // caller's current stream unless `after_caller` is false (fresh receives only); returns
  // the event that marks its end.
  template <class Body>
  std::shared_ptr<CudaEvent> enqueue(const std::string& what, const std::vector<at::Tensor>& tensors, Body&& body,
                                     bool after_caller = true);
  WorkPtr make_work(std::string what, std::shared_ptr<CudaEvent> end, std::vector<at::Tensor> tensors);

  c10::DeviceIndex device_index_;
  StreamLease stream_lease_;  // before stream_: it is initialised from it
  c10::cuda::CUDAStream stream_;
  NcclCore core_;  // last: destroyed (released) first
};

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
