// Two ranks as threads of one process, each with a gloo process group on a shared store:
// a tandem Communicator all-reduces a tensor, then a StageLink sends an activation from
// stage 0 to stage 1 and the gradient back.
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <cstdio>
#include <thread>

#include "comm/c10d_communicator.h"
#include "p2p/stage_link.h"

namespace {

c10::intrusive_ptr<c10d::ProcessGroup> gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size) {
  auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(30));
  opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, size);
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO,
                 c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts));
  return pg;
}

void run(const c10::intrusive_ptr<c10d::Store>& store, int rank) {
  auto comm = std::make_shared<tandem::comm::C10dCommunicator>(gloo_group(store, rank, 2), at::Device(at::kCPU),
                                                               /*timeout_s=*/30.0);
  at::Tensor t = at::full({4}, static_cast<double>(rank + 1));
  comm->all_reduce(t, tandem::comm::ReduceOp::kSum)->wait(std::nullopt);  // [4] summed over 2 ranks

  // stage 0 -> stage 1: an activation forward, its gradient back
  auto link = std::make_shared<tandem::p2p::StageLink>(
      comm, rank == 1 ? std::optional<int>(0) : std::nullopt, rank == 0 ? std::optional<int>(1) : std::nullopt,
      tandem::p2p::ShapeMode::kDynamic, /*timeout_s=*/30.0);
  if (rank == 0) {
    link->send_forward(at::arange(6.0).reshape({2, 3}));
    at::Tensor grad = link->recv_backward(std::nullopt);
    std::printf("all_reduce over 2 ranks: %g %g %g %g\n", t[0].item<double>(), t[1].item<double>(),
                t[2].item<double>(), t[3].item<double>());
    std::printf("stage 0 got the gradient %s, sum %g\n", tandem::comm::tensor_signature(grad).c_str(),
                grad.sum().item<double>());
  } else {
    at::Tensor x = link->recv_forward(std::nullopt);
    link->send_backward(2 * x);
  }
  link->wait_sends(std::nullopt);
}

// run(), reporting an error (a CommError names the rank, the peer and the operation)
bool run_reporting(const c10::intrusive_ptr<c10d::Store>& store, int rank) {
  try {
    run(store, rank);
    return true;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    return false;
  }
}

}  // namespace

int main() {
  auto store = c10::make_intrusive<c10d::HashStore>();
  bool ok1 = false;
  std::thread other([&] { ok1 = run_reporting(store, 1); });
  const bool ok0 = run_reporting(store, 0);
  other.join();
  return ok0 && ok1 ? 0 : 1;
}
