// The NCCL backend of Communicator; see nccl_communicator.h.
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_communicator.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>

#include "comm/errors.h"
#include "comm/nccl_work.h"

namespace tandem::comm {

namespace {

ncclRedOp_t to_nccl(ReduceOp op, at::ScalarType dtype) {
  // bool travels as uint8: a sum would store 2 in a bool; logical or is max (as c10d does)
  if (dtype == at::kBool && op == ReduceOp::kSum) return ncclMax;
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kProduct: return ncclProd;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

size_t count(const at::Tensor& t) { return static_cast<size_t>(t.numel()); }

}  // namespace

std::string nccl_unique_id() {
  ncclUniqueId id;
  nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

std::shared_ptr<NcclCommunicator> NcclCommunicator::create(const std::string& unique_id, int rank, int size,
                                                           int device_index, double timeout_s) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  auto state = NcclCore::init_rank(real_nccl(), unique_id, rank, size, timeout_s);
  return std::shared_ptr<NcclCommunicator>(new NcclCommunicator(std::move(state), rank, size, device_index, timeout_s));
}

NcclCommunicator::NcclCommunicator(std::shared_ptr<NcclState> state, int rank, int size, int device_index,
                                   double timeout_s)
    : Communicator(rank, size, at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index)), timeout_s),
      device_index_(static_cast<c10::DeviceIndex>(device_index)),
      stream_lease_(device_index_),
      stream_(stream_lease_.stream()),
      core_(std::move(state), device_index, timeout_s) {}

void NcclCommunicator::close(std::optional<double> timeout_s) {
  c10::cuda::CUDAGuard guard(device_index_);
  core_.close(timeout_s.value_or(this->timeout_s()));
}

CommunicatorPtr NcclCommunicator::fork(std::optional<double> timeout_s) {
  c10::cuda::CUDAGuard guard(device_index_);
  auto child = NcclCore::split(core_.state(), rank(), this->timeout_s());
  return CommunicatorPtr(new NcclCommunicator(std::move(child), rank(), size(), device_index_,
                                              timeout_s.value_or(this->timeout_s())));
}

template <class Body>
std::shared_ptr<CudaEvent> NcclCommunicator::enqueue(const std::string& what, const std::vector<at::Tensor>& tensors,
                                                     Body&& body, bool after_caller) {
  c10::cuda::CUDAGuard guard(device_index_);
  const cudaStream_t current = c10::cuda::getCurrentCUDAStream(device_index_).stream();
  require_not_capturing(current, what);
  // comm stream waits for the caller's stream: inputs are written, outputs no longer read
  // (fresh receives skip it: their memory came from the comm stream and nobody used it)
  if (after_caller) {
    CudaEvent ready;
    C10_CUDA_CHECK(cudaEventRecord(ready.get(), current));
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream_.stream(), ready.get(), 0));
  }
  // first: the caching allocator must not hand this memory out before the comm stream is
  // done with it, even when enqueueing fails below with the kernels possibly launched
  for (const auto& t : tensors) {
    if (t.storage().nbytes() == 0) continue;
    c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream_);
  }
  core_.post(what, [&](ncclComm_t comm) { body(comm, stream_.stream()); });
  auto end = std::make_shared<CudaEvent>();
  C10_CUDA_CHECK(cudaEventRecord(end->get(), stream_.stream()));
  return end;
}

WorkPtr NcclCommunicator::make_work(std::string what, std::shared_ptr<CudaEvent> end, std::vector<at::Tensor> tensors) {
  core_.track(what, end);
  return std::make_shared<NcclWork>(std::move(what), timeout_s(), core_.state(), std::move(end), std::move(tensors),
                                    device_index_);
}

WorkPtr NcclCommunicator::do_all_reduce(const at::Tensor& t, ReduceOp op, std::string what) {
  const ncclDataType_t dtype = nccl_dtype(t.scalar_type(), what);
  // t [n...] -> t [n...] reduced over the group, in place
  auto end = enqueue(what, {t}, [&](ncclComm_t comm, cudaStream_t stream) {
    nccl_check(ncclAllReduce(t.data_ptr(), t.data_ptr(), count(t), dtype, to_nccl(op, t.scalar_type()), comm, stream), what);
  });
  return make_work(std::move(what), std::move(end), {t});
}

WorkPtr NcclCommunicator::do_all_gather(const at::Tensor& out, const at::Tensor& in, std::string what) {
  const ncclDataType_t dtype = nccl_dtype(in.scalar_type(), what);
  // in [n0, ...] on each rank -> out [size * n0, ...]
  auto end = enqueue(what, {out, in}, [&](ncclComm_t comm, cudaStream_t stream) {
    nccl_check(ncclAllGather(in.data_ptr(), out.data_ptr(), count(in), dtype, comm, stream), what);
  });
  return make_work(std::move(what), std::move(end), {out, in});
}

WorkPtr NcclCommunicator::do_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op,
                                            std::string what) {
  const ncclDataType_t dtype = nccl_dtype(in.scalar_type(), what);
  // in [size * n0, ...] reduced over the group -> out [n0, ...], this rank's block
  auto end = enqueue(what, {out, in}, [&](ncclComm_t comm, cudaStream_t stream) {
    nccl_check(ncclReduceScatter(in.data_ptr(), out.data_ptr(), count(out), dtype, to_nccl(op, in.scalar_type()), comm, stream), what);
  });
  return make_work(std::move(what), std::move(end), {out, in});
}

at::Tensor NcclCommunicator::empty_for_recv(at::IntArrayRef shape, at::ScalarType dtype) {
  // the block belongs to the comm stream: a receive on it is ordered after the block's
  // earlier users without waiting for the caller's stream
  c10::cuda::CUDAStreamGuard guard(stream_);
  return at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kCUDA, device_index_));
}

std::vector<WorkPtr> NcclCommunicator::do_batch_p2p(const std::vector<P2POp>& ops,
                                                    const std::vector<std::string>& whats) {
  std::vector<at::Tensor> tensors;
  bool fresh = true;
  for (const auto& op : ops) {
    tensors.push_back(op.tensor);
    fresh = fresh && op.kind == P2PKind::kRecv && op.fresh;
  }
  // one NCCL group: the sends and recvs progress together, in any order on the peers. Point
  // to point interprets nothing: every dtype (int16, complex, float8, ...) travels as its
  // bytes, t [n...] -> numel * element_size uint8
  auto end = enqueue(whats.front(), tensors, [&](ncclComm_t comm, cudaStream_t stream) {
    for (size_t i = 0; i < ops.size(); ++i) {
      const at::Tensor& t = ops[i].tensor;
      const size_t bytes = nccl_p2p_bytes(t.scalar_type(), t.numel());
      if (ops[i].kind == P2PKind::kSend) {
        nccl_check(ncclSend(t.data_ptr(), bytes, ncclUint8, ops[i].peer, comm, stream), whats[i]);
      } else {
        nccl_check(ncclRecv(t.data_ptr(), bytes, ncclUint8, ops[i].peer, comm, stream), whats[i]);
      }
    }
  }, /*after_caller=*/!fresh);
  std::vector<WorkPtr> works;
  for (size_t i = 0; i < ops.size(); ++i) works.push_back(make_work(whats[i], end, {ops[i].tensor}));
  return works;
}

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
