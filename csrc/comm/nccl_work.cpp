// NcclWork: stream-ordered wait, host wait with a deadline, completion query.
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_work.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <thread>

#include "comm/errors.h"

namespace tandem::comm {

NcclWork::NcclWork(std::string what, double timeout_s, std::shared_ptr<NcclState> state,
                   std::shared_ptr<CudaEvent> end, std::vector<at::Tensor> tensors, c10::DeviceIndex device)
    : Work(std::move(what), timeout_s),
      state_(std::move(state)),
      end_(std::move(end)),
      tensors_(std::move(tensors)),
      device_(device),
      deadline_(deadline_after(timeout_s)) {}

bool NcclWork::event_done() const { return cudaEventQuery(end_->get()) == cudaSuccess; }

void NcclWork::wait(std::optional<double>) {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->raise_if_failed_locked();
  }
  // current stream: ... -> wait(end of this operation on the comm stream) -> ...
  C10_CUDA_CHECK(cudaStreamWaitEvent(c10::cuda::getCurrentCUDAStream(device_).stream(), end_->get(), 0));
}

void NcclWork::synchronize(std::optional<double> timeout_s) {
  const double limit = timeout_or_default(timeout_s);
  const auto deadline = deadline_after(limit);
  auto pause = std::chrono::microseconds(1);
  while (true) {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->raise_if_failed_locked();
    }
    const cudaError_t status = cudaEventQuery(end_->get());
    if (status == cudaSuccess) return;
    if (status != cudaErrorNotReady) {
      C10_CUDA_CHECK(status);
    }
    if (Clock::now() > deadline) {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%.3g s", limit);
      throw CommTimeout(what() + ": timed out after " + buf);
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(200));
  }
}

bool NcclWork::is_completed() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (!state_->error.empty()) return true;
  }
  const cudaError_t status = cudaEventQuery(end_->get());
  if (status == cudaSuccess) return true;
  if (status != cudaErrorNotReady) C10_CUDA_CHECK(status);
  return false;
}

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
