#pragma once
// StageLink: the send/recv runtime between adjacent pipeline stages.
//
// Forward traffic (activations, stage i -> i+1) and backward traffic (gradients, stage
// i -> i-1) run on two forks of the communicator (NCCL: separate communicators and
// streams; c10d: separate tags), so a pending recv in one direction never blocks a send in
// the other, even at pp=2 where the previous and the next stage are the same rank. Sends
// are asynchronous (kept alive here until they complete); receives return the tensor.
//
// Shapes: "dynamic" sends an int64 header (ndim, dtype, shape) before each tensor;
// "static" sends it once per direction (a handshake on first use), then preallocated
// receive buffers are reused and a later shape/dtype change is an error.
#include <deque>
#include <optional>

#include "comm/communicator.h"
#include "p2p/tensor_meta.h"

namespace tandem::p2p {

enum class ShapeMode { kStatic, kDynamic };

ShapeMode parse_shape_mode(const std::string& name);  // "static" | "dynamic"

class StageLink {
 public:
  // prev/next: ranks in comm's group (nullopt at the first / last stage). Collective: every
  // rank of the group builds its StageLink (they fork the communicator), in the same order.
  StageLink(comm::CommunicatorPtr comm, std::optional<int> prev, std::optional<int> next, ShapeMode mode,
            double timeout_s);

  // timeout_s: this call's limit on each wait (default: the link's).
  void send_forward(const at::Tensor& activation);                      // to next
  at::Tensor recv_forward(std::optional<double> timeout_s);              // from prev
  void send_backward(const at::Tensor& grad);                           // to prev
  at::Tensor recv_backward(std::optional<double> timeout_s);             // from next
  // Both directions in flight at once: send to next, receive the gradient from next.
  at::Tensor send_forward_recv_backward(const at::Tensor& activation, std::optional<double> timeout_s);
  // Send the gradient to prev, receive the next activation from prev.
  at::Tensor send_backward_recv_forward(const at::Tensor& grad, std::optional<double> timeout_s);
  // Waits for every pending send (CPU: the host blocks; CUDA: the current stream waits), so
  // the sent tensors may be modified afterwards.
  void wait_sends(std::optional<double> timeout_s);

  int stage() const { return stage_; }
  std::optional<int> prev() const { return prev_; }
  std::optional<int> next() const { return next_; }
  ShapeMode mode() const { return mode_; }
  double timeout_s() const { return timeout_s_; }
  size_t pending_sends() const { return pending_.size(); }

 private:
  // Traffic in one direction with one peer.
  struct Direction {
    comm::CommunicatorPtr comm;
    std::optional<int> peer;
    const char* op;        // "send_forward", "recv_forward", ...
    const char* role;      // "last" / "first": which stage has no such peer
    std::optional<TensorMeta> agreed;  // static mode: the meta of the first tensor
    std::vector<c10::Storage> pool;    // static mode: memory of receive buffers
  };
  struct PendingSend {
    comm::WorkPtr work;
    std::string what;
  };

  void post_send(Direction& d, const at::Tensor& t);
  at::Tensor receive(Direction& d, double timeout_s);
  at::Tensor acquire_buffer(Direction& d, const TensorMeta& meta);
  void reap_sends();
  std::string describe(const Direction& d) const;  // "stage 1: recv_forward from stage 0"
  void require_peer(const Direction& d) const;

  comm::CommunicatorPtr fwd_;  // forward traffic
  comm::CommunicatorPtr bwd_;  // backward traffic
  int stage_;
  std::optional<int> prev_, next_;
  ShapeMode mode_;
  double timeout_s_;
  at::Device device_;
  Direction send_fwd_, recv_fwd_, send_bwd_, recv_bwd_;
  std::deque<PendingSend> pending_;
};

}  // namespace tandem::p2p
