#pragma once
// The c10d backend: the Communicator's operations on a torch.distributed ProcessGroup
// (gloo on CPU), so every scheduling path of tandem runs in CPU tests.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <map>
#include <mutex>

#include "comm/communicator.h"

namespace tandem::comm {

class P2PWaitQueue;

class C10dCommunicator final : public Communicator {
 public:
  C10dCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> pg, at::Device device, double timeout_s);
  ~C10dCommunicator() override;

  std::string backend() const override { return "c10d:" + pg_->getBackendName(); }
  // Same ProcessGroup, a fresh p2p tag: its sends/recvs never match this one's.
  CommunicatorPtr fork(std::optional<double> timeout_s) override;
  // Marks this communicator aborted: later calls raise, and so do the waits in progress on
  // its operations (from any thread; they end within a slice of 20 ms). The operations stay
  // posted (see C10dWork::cancel). The ProcessGroup is the caller's and stays up; use
  // dist.destroy_process_group to end it.
  void abort() override;
  // Later calls raise; nothing to flush (gloo's operations are the caller's to wait for).
  void close(std::optional<double> timeout_s) override;

 protected:
  WorkPtr do_all_reduce(const at::Tensor& t, ReduceOp op, std::string what) override;
  WorkPtr do_all_gather(const at::Tensor& out, const at::Tensor& in, std::string what) override;
  WorkPtr do_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op, std::string what) override;
  std::vector<WorkPtr> do_batch_p2p(const std::vector<P2POp>& ops, const std::vector<std::string>& whats) override;

 private:
  C10dCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> pg, at::Device device, double timeout_s, int tag,
                   std::shared_ptr<std::atomic<int>> next_tag);
  void check_alive(const std::string& what) const;
  std::chrono::milliseconds timeout_ms() const;
  // The queue whose thread waits for this communicator's sends (or recvs) with `peer`.
  P2PWaitQueue& waits(int peer, P2PKind kind);

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  int tag_;                                    // p2p tag of this communicator
  std::shared_ptr<std::atomic<int>> next_tag_;  // shared by all forks of one root
  // shared with this communicator's works: an abort ends their waits
  std::shared_ptr<std::atomic<bool>> aborted_ = std::make_shared<std::atomic<bool>>(false);
  std::atomic<bool> closed_{false};
  std::mutex waits_mu_;
  std::map<std::pair<int, bool>, std::shared_ptr<P2PWaitQueue>> waits_;  // (peer, is_send)
};

}  // namespace tandem::comm
