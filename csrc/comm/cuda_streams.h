#pragma once
// Streams that tandem creates for its communicators (highest priority), lent out and taken
// back, never destroyed: the caching allocator records events on a stream whenever a tensor
// that was used on it is freed, which can be long after the communicator that used the
// stream is gone. A returned stream goes to the next communicator that asks; while lent, a
// stream is its holder's alone (no other library's kernels queue on it).
#ifdef TANDEM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include <string>

namespace tandem::comm {

// Raises CommError naming `what` when `stream` is capturing a CUDA graph (or cannot be
// used because another stream captures): tandem's NCCL operations are watched from the host
// (events, a watchdog, deadlines), which a graph replay would bypass, and a stream wait on
// an event recorded outside the capture would invalidate it.
void require_not_capturing(cudaStream_t stream, const std::string& what);

class StreamLease {
 public:
  explicit StreamLease(c10::DeviceIndex device);
  ~StreamLease();
  StreamLease(const StreamLease&) = delete;
  StreamLease& operator=(const StreamLease&) = delete;
  c10::cuda::CUDAStream stream() const;

 private:
  c10::DeviceIndex device_;
  cudaStream_t raw_ = nullptr;
};

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
