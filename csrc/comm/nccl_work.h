#pragma once
// NcclWork: an operation enqueued on the NCCL backend's comm stream, with the event that
// marks its end and the tensors it uses (kept alive until it completes).
#ifdef TANDEM_WITH_CUDA
#include <vector>

#include "comm/nccl_state.h"
#include "comm/work.h"

namespace tandem::comm {

class NcclWork final : public Work {
 public:
  // device: the CUDA device (-1: none, the CPU tests' fake events).
  NcclWork(std::string what, double timeout_s, std::shared_ptr<NcclState> state, std::shared_ptr<CudaEvent> end,
           std::vector<at::Tensor> tensors, int device);

  // The caller's current stream waits for the end event; the host does not. Raises when the
  // communicator or its failure domain failed, and inside a CUDA graph capture.
  void wait(std::optional<double> timeout_s) override;
  // The host polls the end event until it fires (at most timeout_s), then raises the
  // communicator's (or its domain's) failure: an operation the watchdog aborted ends too.
  void synchronize(std::optional<double> timeout_s) override;
  // True once the end event fired, or once the communicator failed (wait() then raises).
  bool is_completed() override;

  Clock::time_point deadline() const { return deadline_; }
  std::shared_ptr<CudaEvent> end_event() const { return end_; }

 private:
  void raise_if_failed() const;

  std::shared_ptr<NcclState> state_;
  std::shared_ptr<CudaEvent> end_;
  std::vector<at::Tensor> tensors_;
  int device_;
  Clock::time_point deadline_;
};

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
