// The NCCL backend of Communicator; see nccl_communicator.h.
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_communicator.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>

#include "comm/errors.h"

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

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // calls return at once; we poll with a deadline, so none can hang
  return config;
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
  TORCH_CHECK_VALUE(unique_id.size() == sizeof(ncclUniqueId), "tandem.comm: an ncclUniqueId has ",
                    sizeof(ncclUniqueId), " bytes, got ", unique_id.size());
  TORCH_CHECK_VALUE(rank >= 0 && rank < size, "tandem.comm: rank ", rank, " is not in a group of size ", size);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  ncclUniqueId id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  auto state = std::make_shared<NcclState>();
  state->who = "rank " + std::to_string(rank) + " of " + std::to_string(size);
  {
    std::lock_guard<std::mutex> lock(state->mu);
    ncclConfig_t config = nonblocking_config();
    const std::string what = state->who + ": ncclCommInitRankConfig";
    nccl_check(ncclCommInitRankConfig(&state->comm, size, id, rank, &config), what);
    nccl_wait_ready_locked(*state, what, deadline_after(timeout_s));
  }
  return std::shared_ptr<NcclCommunicator>(new NcclCommunicator(state, rank, size, device_index, timeout_s));
}

NcclCommunicator::NcclCommunicator(std::shared_ptr<NcclState> state, int rank, int size, int device_index,
                                   double timeout_s)
    : Communicator(rank, size, at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index)), timeout_s),
      state_(std::move(state)),
      device_index_(static_cast<c10::DeviceIndex>(device_index)),
      stream_lease_(device_index_),
      stream_(stream_lease_.stream()),
      watchdog_(std::make_unique<NcclWatchdog>(state_, device_index_)) {}

NcclCommunicator::~NcclCommunicator() {
  watchdog_.reset();  // joins its thread (it holds no tensors: the Works do)
  // Not closed: abort (local; never waits for peers, so a process can always exit). Works
  // still in flight then raise instead of reporting aborted operations as done.
  std::lock_guard<std::mutex> lock(state_->mu);
  if (state_->comm != nullptr) state_->fail_locked(who() + ": the communicator was destroyed", false);
}

void NcclCommunicator::abort() {
  state_->abort_requested = true;  // an enqueue polling under the lock gives up now
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->fail_locked(who() + ": the communicator was aborted", false);
}

void NcclCommunicator::close(std::optional<double> timeout_s) {
  c10::cuda::CUDAGuard guard(device_index_);
  std::lock_guard<std::mutex> lock(state_->mu);
  if (state_->closed) return;
  state_->raise_if_failed_locked();  // an aborted or failed communicator says so
  const std::string what = who() + ": close (ncclCommFinalize)";
  // Finalize flushes this communicator's pending operations (which needs the peers), then
  // destroy frees it. Past the deadline the poll aborts it and raises CommTimeout. Works
  // that completed stay good; new operations raise.
  nccl_check(ncclCommFinalize(state_->comm), what);
  nccl_wait_ready_locked(*state_, what, deadline_after(timeout_s.value_or(this->timeout_s())));
  ncclCommDestroy(state_->comm);
  state_->comm = nullptr;
  state_->closed = true;
}

void NcclCommunicator::check() {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->raise_if_failed_locked();
  if (state_->comm == nullptr) return;
  ncclResult_t status = ncclSuccess;
  if (ncclCommGetAsyncError(state_->comm, &status) != ncclSuccess) status = ncclInternalError;
  if (status != ncclSuccess && status != ncclInProgress) {
    state_->fail_locked(who() + ": NCCL asynchronous error: " + ncclGetErrorString(status), false);
    state_->raise_if_failed_locked();
  }
}

CommunicatorPtr NcclCommunicator::fork(std::optional<double> timeout_s) {
  c10::cuda::CUDAGuard guard(device_index_);
  auto child = std::make_shared<NcclState>();
  child->who = state_->who;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->raise_if_failed_locked();
    if (state_->closed) throw CommError(who() + ": fork: the communicator was closed");
    ncclConfig_t config = nonblocking_config();
    const std::string what = who() + ": ncclCommSplit";
    // color 0, key = rank: the same ranks in the same order, an independent communicator
    nccl_check(ncclCommSplit(state_->comm, 0, rank(), &child->comm, &config), what);
    try {
      nccl_wait_ready_locked(*state_, what, deadline_after(this->timeout_s()));
    } catch (...) {  // the parent failed (and was aborted): the half-made child goes too
      if (child->comm) ncclCommAbort(child->comm);
      child->comm = nullptr;
      throw;
    }
    std::lock_guard<std::mutex> child_lock(child->mu);
    nccl_wait_ready_locked(*child, what, deadline_after(this->timeout_s()));
  }
  return CommunicatorPtr(new NcclCommunicator(child, rank(), size(), device_index_,
                                              timeout_s.value_or(this->timeout_s())));
}

template <class Body>
std::shared_ptr<CudaEvent> NcclCommunicator::enqueue(const std::string& what, const std::vector<at::Tensor>& tensors,
                                                     Body&& body, bool after_caller) {
  c10::cuda::CUDAGuard guard(device_index_);
  const cudaStream_t current = c10::cuda::getCurrentCUDAStream(device_index_).stream();
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
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->raise_if_failed_locked();
    if (state_->closed) throw CommError(what + ": the communicator was closed");
    nccl_check(ncclGroupStart(), what);
    try {
      body(state_->comm, stream_.stream());
    } catch (...) {
      ncclGroupEnd();  // close the group before the error leaves
      throw;
    }
    nccl_check(ncclGroupEnd(), what);
    // non-blocking: the group is enqueued on the stream only once the communicator is ready
    nccl_wait_ready_locked(*state_, what, deadline_after(timeout_s()));
  }
  auto end = std::make_shared<CudaEvent>();
  C10_CUDA_CHECK(cudaEventRecord(end->get(), stream_.stream()));
  return end;
}

WorkPtr NcclCommunicator::make_work(std::string what, std::shared_ptr<CudaEvent> end, std::vector<at::Tensor> tensors) {
  auto work = std::make_shared<NcclWork>(std::move(what), timeout_s(), state_, std::move(end), std::move(tensors),
                                         device_index_);
  watchdog_->track(*work);
  return work;
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
  std::vector<ncclDataType_t> dtypes;
  bool fresh = true;
  for (size_t i = 0; i < ops.size(); ++i) {
    tensors.push_back(ops[i].tensor);
    dtypes.push_back(nccl_dtype(ops[i].tensor.scalar_type(), whats[i]));
    fresh = fresh && ops[i].kind == P2PKind::kRecv && ops[i].fresh;
  }
  // one NCCL group: the sends and recvs progress together, in any order on the peers
  auto end = enqueue(whats.front(), tensors, [&](ncclComm_t comm, cudaStream_t stream) {
    for (size_t i = 0; i < ops.size(); ++i) {
      const at::Tensor& t = ops[i].tensor;
      if (ops[i].kind == P2PKind::kSend) {
        nccl_check(ncclSend(t.data_ptr(), count(t), dtypes[i], ops[i].peer, comm, stream), whats[i]);
      } else {
        nccl_check(ncclRecv(t.data_ptr(), count(t), dtypes[i], ops[i].peer, comm, stream), whats[i]);
      }
    }
  }, /*after_caller=*/!fresh);
  std::vector<WorkPtr> works;
  for (size_t i = 0; i < ops.size(); ++i) works.push_back(make_work(whats[i], end, {ops[i].tensor}));
  return works;
}

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
