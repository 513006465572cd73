// NcclWork: stream-ordered wait, host wait with a deadline, completion query.
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_work.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "comm/cuda_streams.h"
#include "comm/errors.h"

namespace tandem::comm {

NcclWork::NcclWork(std::string what, double timeout_s, std::shared_ptr<NcclState> state,
                   std::shared_ptr<CudaEvent> end, std::vector<at::Tensor> tensors, int device)
    : Work(std::move(what), timeout_s),
      state_(std::move(state)),
      end_(std::move(end)),
      tensors_(std::move(tensors)),
      device_(device),
      deadline_(deadline_after(timeout_s)) {}

void NcclWork::raise_if_failed() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->raise_if_failed_locked();
}

void NcclWork::wait(std::optional<double>) {
  raise_if_failed();
  if (device_ < 0) return;  // no device (the CPU tests' fakes): no stream to order
  const cudaStream_t current = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  require_not_capturing(current, what() + ": wait");
  // current stream: ... -> wait(end of this operation on the comm stream) -> ...
  C10_CUDA_CHECK(cudaStreamWaitEvent(current, end_->get(), 0));
}

void NcclWork::synchronize(std::optional<double> timeout_s) {
  const double limit = timeout_or_default(timeout_s);
  const auto deadline = deadline_after(limit);
  Backoff backoff(Backoff::kDefaultSpin, std::chrono::microseconds(200));
  while (true) {
    raise_if_failed();
    const cudaError_t status = state_->api->event_query(end_->get());
    if (status == cudaSuccess) break;
    if (status != cudaErrorNotReady) C10_CUDA_CHECK(status);
    if (Clock::now() > deadline) throw CommTimeout(what() + ": timed out after " + seconds_str(limit));
    backoff.pause();
  }
  raise_if_failed();  // the event also fires when the watchdog aborted the operation
}

bool NcclWork::is_completed() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->failed_locked()) return true;
  }
  const cudaError_t status = state_->api->event_query(end_->get());
  if (status == cudaSuccess) return true;
  if (status != cudaErrorNotReady) C10_CUDA_CHECK(status);
  return false;
}

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
