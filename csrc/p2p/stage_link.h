#pragma once
// StageLink: the send/recv runtime between adjacent pipeline stages.
//
// Forward traffic (activations, stage i -> i+1) and backward traffic (gradients, stage
// i -> i-1) run on separate forks of the communicator, and so do a rank's incoming and
// outgoing edges of each: the edge a -> a+1 gets fork (a mod 2), the wrap-around edge of an
// odd ring a third one. So a pending receive never blocks a send on the same rank (NCCL:
// separate communicators and streams; c10d: separate tags), at pp=2 where prev and next
// are the same rank, and around a ring. (Neighbours other than rank +-1 may share a fork.)
//
// Sends are asynchronous (kept alive here until they complete). Receives are posted early
// with irecv_* and return a RecvHandle; messages of one direction match in posting order.
//
// Shapes: "dynamic" sends an int64 header (ndim, dtype, shape) before each tensor;
// "static" sends it once per direction (a handshake on first use), then preallocated
// receive buffers are reused, and a later shape/dtype change is an error on the sender,
// which posts it on the error board so that the receiver raises it too.
#include <deque>
#include <optional>

#include "comm/communicator.h"
#include "p2p/error_board.h"
#include "p2p/tensor_meta.h"

namespace tandem::p2p {

enum class ShapeMode { kStatic, kDynamic };

ShapeMode parse_shape_mode(const std::string& name);  // "static" | "dynamic"

class StageLink;
struct PostedRecv;

// One posted receive.
class RecvHandle {
 public:
  RecvHandle(std::shared_ptr<StageLink> link, std::shared_ptr<PostedRecv> recv);
  // Non-blocking: has the tensor landed (or the receive failed)? Also moves the link's
  // queued receives onto the wire when their headers arrived.
  bool is_completed();
  // The received tensor (CPU: received; CUDA: ordered on the current stream). At most
  // timeout_s (default: the link's); raises CommTimeout / CommError naming this stage, the
  // peer and the operation. Once per handle.
  at::Tensor wait(std::optional<double> timeout_s);
  const std::string& what() const;

 private:
  std::shared_ptr<StageLink> link_;
  std::shared_ptr<PostedRecv> recv_;
};

class StageLink : public std::enable_shared_from_this<StageLink> {
 public:
  // prev/next: ranks in comm's group (nullopt at the first / last stage). Collective: every
  // rank of the group builds its StageLink (they fork the communicator), in the same order.
  // board: where a failing stage posts its error and waiting stages look (default: local).
  StageLink(comm::CommunicatorPtr comm, std::optional<int> prev, std::optional<int> next, ShapeMode mode,
            double timeout_s, ErrorBoard board = ErrorBoard());

  // timeout_s: this call's limit on each wait (default: the link's).
  void send_forward(const at::Tensor& activation);  // to next
  void send_backward(const at::Tensor& grad);       // to prev
  std::shared_ptr<RecvHandle> irecv_forward();      // from prev
  std::shared_ptr<RecvHandle> irecv_backward();     // from next
  at::Tensor recv_forward(std::optional<double> timeout_s);
  at::Tensor recv_backward(std::optional<double> timeout_s);
  // Both directions in flight at once: send to next, receive the gradient from next.
  at::Tensor send_forward_recv_backward(const at::Tensor& activation, std::optional<double> timeout_s);
  // Send the gradient to prev, receive the next activation from prev.
  at::Tensor send_backward_recv_forward(const at::Tensor& grad, std::optional<double> timeout_s);
  // Waits for every pending send (CPU: the host blocks; CUDA: the current stream waits), so
  // the sent tensors may be modified afterwards.
  void wait_sends(std::optional<double> timeout_s);
  // Puts queued receives on the wire whose headers have landed (non-blocking); call it
  // between computations so that dynamic-shape data lands early.
  void progress();
  // Posts `message` on the error board: every stage waiting on this link's board raises it.
  void post_error(const std::string& message) { board_.post(message); }
  // Aborts the link's communicators (local: never waits for a peer): all revoked first, so a
  // fork whose stream waits behind another fork's stuck receive does not hold the abort;
  // later calls raise.
  void abort();
  // The host waits until every transfer posted on the link so far completed (at most
  // timeout_s, default the link's; reading the error board), then raises if one failed
  // (here, or anywhere in the communicators' failure domain). On CUDA, where waits only
  // order streams, call it before the optimizer steps on what the link received: a receive
  // the watchdog aborted (a peer died) leaves its buffer unfilled and the stream runs on.
  void synchronize(std::optional<double> timeout_s);
  // A local end: every fork released (waits for its transfers in flight, then destroys it;
  // aborts it when they do not end in time or it failed). Later calls raise.
  void release(std::optional<double> timeout_s);

  int stage() const { return stage_; }
  std::optional<int> prev() const { return prev_; }
  std::optional<int> next() const { return next_; }
  ShapeMode mode() const { return mode_; }
  double timeout_s() const { return timeout_s_; }
  size_t pending_sends() const { return pending_.size(); }
  const std::string& board_key() const { return board_.key(); }

 private:
  friend class RecvHandle;

  // Traffic in one direction with one peer.
  struct Direction {
    comm::CommunicatorPtr comm;
    std::optional<int> peer;
    const char* op;                    // "send_forward", "recv_forward", ...
    const char* role;                  // "last" / "first": which stage has no such peer
    std::optional<TensorMeta> agreed;  // static mode: the meta of the first tensor
    bool handshake_posted = false;     // static mode: the first receive expects the header
    std::vector<c10::Storage> pool;    // static mode: memory of receive buffers
    std::deque<std::shared_ptr<PostedRecv>> queued;  // receives not yet on the wire, in order
    std::string failed;                // a receive failed: the order is lost, later ones fail
  };
  struct PendingSend {
    comm::WorkPtr work;
    std::string what;
  };

  // Uses every fork's edges once, while every rank is here (see stage_link.cpp).
  void connect();
  std::vector<comm::CommunicatorPtr> forks() const;  // fwd_ then bwd_
  void post_send(Direction& d, const at::Tensor& t);
  std::shared_ptr<RecvHandle> post_recv(Direction& d);
  // Puts queued receives of d on the wire while their metadata is known (non-blocking).
  void progress(Direction& d);
  bool is_completed(PostedRecv& r);
  at::Tensor wait(PostedRecv& r, double timeout_s);
  // Waits for `work` until `deadline`, reading the error board meanwhile (host waits only).
  void await(comm::Work& work, const std::string& what, double limit_s,
             std::chrono::steady_clock::time_point deadline, bool host);
  at::Tensor acquire_buffer(Direction& d, const TensorMeta& meta);
  // A receive into new memory (P2POp::fresh): on CUDA it does not wait for the caller's stream.
  comm::WorkPtr fresh_recv(Direction& d, const at::Tensor& buf, const std::string& what);
  // Marks d failed (its order is lost): later receives on it raise.
  void fail(Direction& d, const std::string& why);
  // The header of r (landed) on the host, without waiting for the caller's stream.
  at::Tensor header_on_host(PostedRecv& r);
  void reap_sends();
  std::string describe(const Direction& d) const;  // "stage 1: recv_forward from stage 0"
  void require_peer(const Direction& d) const;

  std::vector<comm::CommunicatorPtr> fwd_;  // forward traffic, one fork per edge color
  std::vector<comm::CommunicatorPtr> bwd_;  // backward traffic
  int stage_;
  std::optional<int> prev_, next_;
  ShapeMode mode_;
  double timeout_s_;
  at::Device device_;
  ErrorBoard board_;
  Direction send_fwd_, recv_fwd_, send_bwd_, recv_bwd_;
  std::deque<PendingSend> pending_;
};

}  // namespace tandem::p2p
