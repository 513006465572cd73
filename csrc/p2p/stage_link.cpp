// StageLink: see stage_link.h.
#include "p2p/stage_link.h"

#include "comm/errors.h"

namespace tandem::p2p {

namespace {

constexpr size_t kPoolSize = 4;             // static-mode receive buffers per direction
constexpr size_t kMaxPendingSends = 64;     // beyond this a send waits for the oldest

// Re-raises a communication error with the link's words in front (stage, peer, operation).
template <class F>
auto guarded(const std::string& what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const comm::CommTimeout& e) {
    throw comm::CommTimeout(what + ": " + e.what());
  } catch (const comm::CommError& e) {
    throw comm::CommError(what + ": " + e.what());
  }
}

}  // namespace

ShapeMode parse_shape_mode(const std::string& name) {
  if (name == "static") return ShapeMode::kStatic;
  if (name == "dynamic") return ShapeMode::kDynamic;
  TORCH_CHECK_VALUE(false, "tandem.comm.StageLink: shapes must be \"static\" or \"dynamic\", got \"", name, "\"");
}

StageLink::StageLink(comm::CommunicatorPtr comm, std::optional<int> prev, std::optional<int> next, ShapeMode mode,
                     double timeout_s)
    : stage_(comm ? comm->rank() : -1),
      prev_(prev),
      next_(next),
      mode_(mode),
      timeout_s_(timeout_s),
      device_(comm ? comm->device() : at::Device(at::kCPU)) {
  TORCH_CHECK_VALUE(comm, "tandem.comm.StageLink: the communicator is None");
  TORCH_CHECK_VALUE(timeout_s > 0, "tandem.comm.StageLink: timeout must be positive, got ", timeout_s, " s");
  for (auto [name, peer] : {std::pair{"prev_rank", prev}, std::pair{"next_rank", next}}) {
    TORCH_CHECK_VALUE(!peer || (*peer >= 0 && *peer < comm->size() && *peer != comm->rank()),
                      "tandem.comm.StageLink (stage ", stage_, "): ", name, "=", peer.value_or(-1),
                      " must be another rank of the group (0..", comm->size() - 1, ") or None");
  }
  fwd_ = comm->fork();
  bwd_ = comm->fork();
  send_fwd_ = Direction{fwd_, next, "send_forward", "last", std::nullopt, {}};
  recv_fwd_ = Direction{fwd_, prev, "recv_forward", "first", std::nullopt, {}};
  send_bwd_ = Direction{bwd_, prev, "send_backward", "first", std::nullopt, {}};
  recv_bwd_ = Direction{bwd_, next, "recv_backward", "last", std::nullopt, {}};
}

std::string StageLink::describe(const Direction& d) const {
  const bool is_send = d.op[0] == 's';
  return "stage " + std::to_string(stage_) + ": " + d.op + (is_send ? " to" : " from") + " stage " +
         std::to_string(d.peer.value_or(-1));
}

void StageLink::require_peer(const Direction& d) const {
  TORCH_CHECK_VALUE(d.peer.has_value(), "tandem.comm.StageLink (stage ", stage_, "): ", d.op, ": this is the ",
                    d.role, " stage (", d.role[0] == 'l' ? "next_rank" : "prev_rank", " is None)");
}

void StageLink::reap_sends() {
  while (!pending_.empty() && (pending_.front().work->is_completed() || pending_.size() > kMaxPendingSends)) {
    PendingSend p = std::move(pending_.front());
    pending_.pop_front();
    guarded(p.what, [&] { p.work->wait(timeout_s_); });  // raises a failed send's error
  }
}

void StageLink::post_send(Direction& d, const at::Tensor& t) {
  require_peer(d);
  const std::string what = describe(d);
  reap_sends();
  const TensorMeta meta = meta_of(t, "tandem.comm.StageLink (" + what + ")");
  TORCH_CHECK_VALUE(t.device() == device_, "tandem.comm.StageLink (", what, "): tensor is on ", t.device(),
                    " but the link's communicator is on ", device_);
  std::vector<comm::P2POp> ops;
  const bool handshake = mode_ == ShapeMode::kDynamic || !d.agreed;
  if (mode_ == ShapeMode::kStatic && d.agreed && *d.agreed != meta) {
    TORCH_CHECK_VALUE(false, "tandem.comm.StageLink (", what, "): tensor ", meta.str(),
                      " does not match the static shape agreed on first use, ", d.agreed->str(),
                      "; use shapes=\"dynamic\" for tensors whose shape changes");
  }
  if (handshake) {
    at::Tensor header = encode_header(meta);  // int64 [kHeaderLen]: ndim, dtype, shape
    if (!device_.is_cpu()) header = header.pin_memory().to(device_, /*non_blocking=*/true);
    ops.push_back(comm::P2POp{comm::P2PKind::kSend, header, *d.peer});
  }
  ops.push_back(comm::P2POp{comm::P2PKind::kSend, t.contiguous(), *d.peer});
  auto works = guarded(what, [&] { return d.comm->batch_p2p(ops); });
  if (mode_ == ShapeMode::kStatic && !d.agreed) d.agreed = meta;
  for (auto& w : works) pending_.push_back(PendingSend{std::move(w), what});
}

at::Tensor StageLink::acquire_buffer(Direction& d, const TensorMeta& meta) {
  const auto options = at::TensorOptions().dtype(meta.dtype).device(device_);
  // The pool keeps storages, not tensors: once the caller dropped every tensor on one
  // (views and autograd's saved tensors included), only the pool holds it and it is reused.
  for (const auto& storage : d.pool) {
    if (storage.use_count() == 1) return at::empty({0}, options).set_(storage, 0, meta.shape);
  }
  at::Tensor b = at::empty(meta.shape, options);
  if (d.pool.size() < kPoolSize) d.pool.push_back(b.storage());
  return b;
}

at::Tensor StageLink::receive(Direction& d, double timeout_s) {
  require_peer(d);
  const std::string what = describe(d);
  reap_sends();
  TensorMeta meta;
  if (mode_ == ShapeMode::kStatic && d.agreed) {
    meta = *d.agreed;
  } else {
    // int64 [kHeaderLen] from the peer; the host needs it to size the tensor
    at::Tensor header = at::empty({kHeaderLen}, at::TensorOptions().dtype(at::kLong).device(device_));
    guarded(what, [&] {
      auto w = d.comm->recv(header, *d.peer);
      w->synchronize(timeout_s);
      w->wait(timeout_s);  // CUDA: order the copy below after the comm stream
    });
    meta = decode_header(header.cpu(), "tandem.comm.StageLink (" + what + ")");
    if (mode_ == ShapeMode::kStatic) d.agreed = meta;
  }
  at::Tensor out = mode_ == ShapeMode::kStatic
                       ? acquire_buffer(d, meta)
                       : at::empty(meta.shape, at::TensorOptions().dtype(meta.dtype).device(device_));
  guarded(what, [&] { d.comm->recv(out, *d.peer)->wait(timeout_s); });
  return out;
}

void StageLink::send_forward(const at::Tensor& activation) { post_send(send_fwd_, activation); }
at::Tensor StageLink::recv_forward(std::optional<double> timeout_s) {
  return receive(recv_fwd_, timeout_s.value_or(timeout_s_));
}
void StageLink::send_backward(const at::Tensor& grad) { post_send(send_bwd_, grad); }
at::Tensor StageLink::recv_backward(std::optional<double> timeout_s) {
  return receive(recv_bwd_, timeout_s.value_or(timeout_s_));
}

at::Tensor StageLink::send_forward_recv_backward(const at::Tensor& activation, std::optional<double> timeout_s) {
  require_peer(recv_bwd_);
  post_send(send_fwd_, activation);                               // forward communicator: does not wait
  return receive(recv_bwd_, timeout_s.value_or(timeout_s_));      // for this recv on the backward one
}

at::Tensor StageLink::send_backward_recv_forward(const at::Tensor& grad, std::optional<double> timeout_s) {
  require_peer(recv_fwd_);
  post_send(send_bwd_, grad);
  return receive(recv_fwd_, timeout_s.value_or(timeout_s_));
}

void StageLink::wait_sends(std::optional<double> timeout_s) {
  while (!pending_.empty()) {
    PendingSend p = std::move(pending_.front());
    pending_.pop_front();
    guarded(p.what, [&] { p.work->wait(timeout_s.value_or(timeout_s_)); });
  }
}

}  // namespace tandem::p2p
