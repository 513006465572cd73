// StageLink: see stage_link.h.
#include "p2p/stage_link.h"

#include <algorithm>
#include <cstdio>
#include <map>

#ifdef TANDEM_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "comm/cuda_streams.h"
#endif
#include "comm/errors.h"

namespace tandem::p2p {

using Clock = std::chrono::steady_clock;

// One receive: posted by the caller, put on the wire in order, waited for once.
struct PostedRecv {
  int direction = 0;  // 0: forward (from prev), 1: backward (from next)
  std::string what;   // "stage 1: recv_forward from stage 0"
  bool needs_header = false;
  std::optional<TensorMeta> meta;
  at::Tensor header;  // int64 [kHeaderLen]
  comm::WorkPtr header_work;
  at::Tensor buf;  // the tensor, once on the wire
  comm::WorkPtr work;
  bool taken = false;
};

namespace {

constexpr size_t kPoolSize = 4;          // static-mode receive buffers per direction
constexpr size_t kMaxPendingSends = 64;  // beyond this a send waits for the oldest

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

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

std::string seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g s", s);
  return buf;
}

// The fork that carries edge from -> to (see stage_link.h): a rank's incoming and outgoing
// edges along a chain or ring of rank +-1 steps get different ones.
int edge_color(int from, int to, int size) {
  if (size % 2 == 1 && from == size - 1 && to == 0) return 2;
  return from % 2;
}

}  // namespace

ShapeMode parse_shape_mode(const std::string& name) {
  if (name == "static") return ShapeMode::kStatic;
  if (name == "dynamic") return ShapeMode::kDynamic;
  TORCH_CHECK_VALUE(false, "tandem.comm.StageLink: shapes must be \"static\" or \"dynamic\", got \"", name, "\"");
}

// --- RecvHandle -----------------------------------------------------------------------------

RecvHandle::RecvHandle(std::shared_ptr<StageLink> link, std::shared_ptr<PostedRecv> recv)
    : link_(std::move(link)), recv_(std::move(recv)) {}

bool RecvHandle::is_completed() { return link_->is_completed(*recv_); }

at::Tensor RecvHandle::wait(std::optional<double> timeout_s) {
  return link_->wait(*recv_, timeout_s.value_or(link_->timeout_s()));
}

const std::string& RecvHandle::what() const { return recv_->what; }

// --- StageLink ------------------------------------------------------------------------------

StageLink::StageLink(comm::CommunicatorPtr comm, std::optional<int> prev, std::optional<int> next, ShapeMode mode,
                     double timeout_s, ErrorBoard board)
    : stage_(comm ? comm->rank() : -1),
      prev_(prev),
      next_(next),
      mode_(mode),
      timeout_s_(timeout_s),
      device_(comm ? comm->device() : at::Device(at::kCPU)),
      board_(std::move(board)) {
  TORCH_CHECK_VALUE(comm, "tandem.comm.StageLink: the communicator is None");
  TORCH_CHECK_VALUE(timeout_s > 0, "tandem.comm.StageLink: timeout must be positive, got ", timeout_s, " s");
  for (auto [name, peer] : {std::pair{"prev_rank", prev}, std::pair{"next_rank", next}}) {
    TORCH_CHECK_VALUE(!peer || (*peer >= 0 && *peer < comm->size() && *peer != comm->rank()),
                      "tandem.comm.StageLink (stage ", stage_, "): ", name, "=", peer.value_or(-1),
                      " must be another rank of the group (0..", comm->size() - 1, ") or None");
  }
  const int n = comm->size();
  const int colors = n % 2 == 0 ? 2 : 3;  // the same on every rank: forks stay collective
  // the forks' operations time out after the link's timeout (NCCL: their watchdog)
  for (int c = 0; c < colors; ++c) fwd_.push_back(comm->fork(timeout_s));
  for (int c = 0; c < colors; ++c) bwd_.push_back(comm->fork(timeout_s));
  const int me = stage_;
  const int in_color = prev ? edge_color(*prev, me, n) : 0;   // edge prev -> me
  const int out_color = next ? edge_color(me, *next, n) : 0;  // edge me -> next
  send_fwd_ = Direction{fwd_[out_color], next, "send_forward", "last"};
  recv_fwd_ = Direction{fwd_[in_color], prev, "recv_forward", "first"};
  send_bwd_ = Direction{bwd_[in_color], prev, "send_backward", "first"};  // edge prev -> me, reversed
  recv_bwd_ = Direction{bwd_[out_color], next, "recv_backward", "last"};
  connect();
}

// NCCL connects a pair of ranks on a communicator at their first send/recv there, and the
// host waits for that: an early-posted first receive would wait for the peer's first send.
// So every fork's edges are used once here, while every rank is building its link: one
// 1-element message each way of each edge, fork by fork in one order on every rank (along a
// chain or ring of rank +-1 steps a fork's edges are disjoint pairs of ranks, so nobody
// waits on a peer that is elsewhere). Both ends wait for them (on the host, reading the
// error board): nothing of it is left to match later messages.
void StageLink::connect() {
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(device_);
  const std::vector<std::pair<Direction*, Direction*>> uses = {{&send_fwd_, &recv_fwd_}, {&send_bwd_, &recv_bwd_}};
  const auto deadline = deadline_after(timeout_s_);
  for (const auto& [send, recv] : uses) {
    const auto& forks = send == &send_fwd_ ? fwd_ : bwd_;
    for (const auto& fork : forks) {
      std::vector<comm::P2POp> ops;
      std::vector<Direction*> dirs;
      if (recv->peer && recv->comm == fork) {
        ops.push_back({comm::P2PKind::kRecv, at::empty({1}, opts), *recv->peer});
        dirs.push_back(recv);
      }
      if (send->peer && send->comm == fork) {
        ops.push_back({comm::P2PKind::kSend, at::zeros({1}, opts), *send->peer});
        dirs.push_back(send);
      }
      if (ops.empty()) continue;
      auto works = guarded(describe(*dirs.front()) + ": connecting", [&] { return fork->batch_p2p(ops); });
      for (size_t i = 0; i < works.size(); ++i)  // [1] -> [1], per edge
        await(*works[i], describe(*dirs[i]) + ": connecting (does the peer build its StageLink?)", timeout_s_,
              deadline, /*host=*/true);
    }
  }
}

std::vector<comm::CommunicatorPtr> StageLink::forks() const {
  std::vector<comm::CommunicatorPtr> all(fwd_);
  all.insert(all.end(), bwd_.begin(), bwd_.end());
  return all;
}

void StageLink::abort() { comm::abort_all(forks(), /*failure_domains=*/false); }

void StageLink::release(std::optional<double> timeout_s) {
  for (const auto& c : forks()) c->release(timeout_s);
}

void StageLink::synchronize(std::optional<double> timeout_s) {
  const double limit = timeout_s.value_or(timeout_s_);
  TORCH_CHECK_VALUE(limit > 0, "tandem.comm.StageLink (stage ", stage_, "): synchronize: timeout must be positive, got ",
                    limit, " s");
  const std::string what = "stage " + std::to_string(stage_) + ": synchronize";
  const auto deadline = deadline_after(limit);
  wait_sends(limit);  // CPU: the host waits; CUDA: the current stream does (then the host, below)
  try {
    for (const auto& c : forks()) {
      while (!c->wait_idle(std::chrono::duration<double>(ErrorBoard::kCheckInterval).count())) {
        board_.check(Clock::now() >= deadline);  // a peer's posted failure ends the wait
        if (Clock::now() >= deadline)
          throw comm::CommTimeout("transfers still in flight after " + seconds(limit));
      }
    }
    for (const auto& c : forks()) c->check();  // a failure here or in the failure domain
  } catch (const comm::CommTimeout& e) {
    throw comm::CommTimeout(what + ": " + e.what());
  } catch (const comm::CommError& e) {
    try {
      board_.check(true);  // a peer's posted error explains ours
    } catch (const comm::CommError& posted) {
      throw comm::CommError(what + ": a stage reported: " + posted.what());
    }
    throw comm::CommError(what + ": " + e.what());
  }
}

void StageLink::fail(Direction& d, const std::string& why) {
  if (d.failed.empty()) d.failed = why.empty() ? describe(d) + ": failed" : why;
  // Receives already on the wire stay posted (a late message lands in their buffers);
  // queued ones never go out.
  d.queued.clear();
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

// --- sends ------------------------------------------------------------------------------------

void StageLink::reap_sends() {
  while (!pending_.empty() && (pending_.front().work->is_completed() || pending_.size() > kMaxPendingSends)) {
    PendingSend p = std::move(pending_.front());
    pending_.pop_front();
    // raises a failed send's error; an overflowing queue waits for its oldest send
    await(*p.work, p.what, timeout_s_, deadline_after(timeout_s_), device_.is_cpu());
  }
}

void StageLink::post_send(Direction& d, const at::Tensor& t) {
  require_peer(d);
  const std::string what = describe(d);
  reap_sends();
  const TensorMeta meta = meta_of(t, "tandem.comm.StageLink (" + what + ")");
  TORCH_CHECK_VALUE(t.device() == device_, "tandem.comm.StageLink (", what, "): tensor is on ", t.device(),
                    " but the link's communicator is on ", device_);
  if (mode_ == ShapeMode::kStatic && d.agreed && *d.agreed != meta) {
    const std::string message = "tandem.comm.StageLink (" + what + "): tensor " + meta.str() +
                                " does not match the static shape agreed on first use, " + d.agreed->str() +
                                "; use shapes=\"dynamic\" for tensors whose shape changes";
    board_.post(message);  // the receiver raises it too, instead of waiting for its timeout
    TORCH_CHECK_VALUE(false, message);
  }
  std::vector<comm::P2POp> ops;
  if (mode_ == ShapeMode::kDynamic || !d.agreed) {
    at::Tensor header = encode_header(meta);  // int64 [kHeaderLen]: ndim, dtype, shape
    if (!device_.is_cpu()) header = header.pin_memory().to(device_, /*non_blocking=*/true);
    ops.push_back(comm::P2POp{comm::P2PKind::kSend, header, *d.peer});
  }
  ops.push_back(comm::P2POp{comm::P2PKind::kSend, t.contiguous(), *d.peer});
  auto works = guarded(what, [&] { return d.comm->batch_p2p(ops); });
  if (mode_ == ShapeMode::kStatic && !d.agreed) d.agreed = meta;
  for (auto& w : works) pending_.push_back(PendingSend{std::move(w), what});
}

void StageLink::send_forward(const at::Tensor& activation) { post_send(send_fwd_, activation); }
void StageLink::send_backward(const at::Tensor& grad) { post_send(send_bwd_, grad); }

void StageLink::wait_sends(std::optional<double> timeout_s) {
  const double limit = timeout_s.value_or(timeout_s_);
  const auto deadline = deadline_after(limit);
  while (!pending_.empty()) {
    PendingSend p = std::move(pending_.front());
    pending_.pop_front();
    await(*p.work, p.what, limit, deadline, device_.is_cpu());  // reads the error board meanwhile
  }
}

// --- receives ---------------------------------------------------------------------------------

at::Tensor StageLink::acquire_buffer(Direction& d, const TensorMeta& meta) {
  const auto options = at::TensorOptions().dtype(meta.dtype).device(device_);
  // CUDA: the caching allocator already reuses memory, and knows which streams still use
  // it (a reader of a received tensor on another stream would not be seen by a pool).
  if (!device_.is_cpu()) return d.comm->empty_for_recv(meta.shape, meta.dtype);
  // The pool keeps storages, not tensors: once the caller dropped every tensor on one
  // (views and autograd's saved tensors included), only the pool holds it and it is reused.
  for (const auto& storage : d.pool) {
    if (storage.use_count() == 1) return at::empty({0}, options).set_(storage, 0, meta.shape);
  }
  at::Tensor b = at::empty(meta.shape, options);
  if (d.pool.size() < kPoolSize) d.pool.push_back(b.storage());
  return b;
}

std::shared_ptr<RecvHandle> StageLink::post_recv(Direction& d) {
  require_peer(d);
  if (!d.failed.empty()) throw comm::CommError(describe(d) + ": an earlier receive failed (" + d.failed + ")");
  reap_sends();
  auto r = std::make_shared<PostedRecv>();
  r->direction = &d == &recv_fwd_ ? 0 : 1;
  r->what = describe(d);
  if (mode_ == ShapeMode::kDynamic || (!d.agreed && !d.handshake_posted)) {
    r->needs_header = true;
    d.handshake_posted = true;
  } else if (d.agreed) {
    r->meta = d.agreed;
  }  // else: static, behind the handshake: the header's meta, once it lands
  d.queued.push_back(r);
  try {
    progress(d);
  } catch (const std::exception& e) {
    fail(d, e.what());  // no handle to return: the receive would be orphaned
    throw;
  }
  return std::make_shared<RecvHandle>(shared_from_this(), r);
}

std::shared_ptr<RecvHandle> StageLink::irecv_forward() { return post_recv(recv_fwd_); }
std::shared_ptr<RecvHandle> StageLink::irecv_backward() { return post_recv(recv_bwd_); }

void StageLink::progress(Direction& d) {
  while (!d.queued.empty()) {
    PostedRecv& r = *d.queued.front();
    if (!r.meta && !r.needs_header) r.meta = d.agreed;  // the handshake ahead of it landed
    if (!r.meta) {
      if (!r.header_work) {
        // int64 [kHeaderLen] from the peer; the host needs it to size the tensor
        r.header = d.comm->empty_for_recv({kHeaderLen}, at::kLong);
        r.header_work = fresh_recv(d, r.header, r.what);
      }
      if (!r.header_work->is_completed()) return;
      guarded(r.what, [&] { r.header_work->synchronize(timeout_s_); });  // completed: raises its error
      r.meta = decode_header(header_on_host(r), "tandem.comm.StageLink (" + r.what + ")");
      if (mode_ == ShapeMode::kStatic) d.agreed = r.meta;
    }
    r.buf = mode_ == ShapeMode::kStatic ? acquire_buffer(d, *r.meta)
                                        : d.comm->empty_for_recv(r.meta->shape, r.meta->dtype);
    r.work = fresh_recv(d, r.buf, r.what);
    d.queued.pop_front();
  }
}

comm::WorkPtr StageLink::fresh_recv(Direction& d, const at::Tensor& buf, const std::string& what) {
  // buf is new memory (empty_for_recv or a CPU pool storage nobody holds): on CUDA the
  // receive need not wait for the compute queued on the caller's stream
  return guarded(what, [&] {
    return d.comm->batch_p2p({comm::P2POp{comm::P2PKind::kRecv, buf, *d.peer, /*fresh=*/true}}).front();
  });
}

void StageLink::progress() {
  for (Direction* d : {&recv_fwd_, &recv_bwd_}) {
    if (d->queued.empty() || !d->failed.empty()) continue;
    try {
      progress(*d);
    } catch (const std::exception&) {  // the receives' wait() raises it
    }
  }
}

at::Tensor StageLink::header_on_host(PostedRecv& r) {
#ifdef TANDEM_WITH_CUDA
  if (device_.is_cuda()) {
    // A side stream waits for the header (landed already) and copies it; the host waits for
    // that copy only, not for the compute queued on the caller's stream.
    static thread_local std::map<c10::DeviceIndex, std::unique_ptr<comm::StreamLease>> side;
    auto& lease = side[device_.index()];
    if (!lease) lease = std::make_unique<comm::StreamLease>(device_.index());
    c10::cuda::CUDAStreamGuard guard(lease->stream());
    r.header_work->wait(timeout_s_);  // the side stream after the comm stream
    at::Tensor host = at::empty({kHeaderLen}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    host.copy_(r.header, /*non_blocking=*/true);
    lease->stream().synchronize();
    return host;
  }
#endif
  r.header_work->wait(timeout_s_);
  return r.header;
}

bool StageLink::is_completed(PostedRecv& r) {
  if (r.taken) return true;
  Direction& d = r.direction == 0 ? recv_fwd_ : recv_bwd_;
  if (!r.work && !d.failed.empty()) return true;  // wait() raises
  if (!r.work) {
    try {
      progress(d);
    } catch (const std::exception&) {
      return true;  // wait() raises it
    }
  }
  return r.work && r.work->is_completed();
}

void StageLink::await(comm::Work& work, const std::string& what, double limit_s, Clock::time_point deadline,
                      bool host) {
  try {
    if (!host) {  // CUDA: the current stream waits; the watchdog owns the deadline
      board_.check(false);
      work.wait(limit_s);
      return;
    }
    while (!work.wait_for(std::chrono::duration<double>(ErrorBoard::kCheckInterval).count())) {
      try {
        board_.check(Clock::now() >= deadline);  // forced at the deadline: it explains the silence
      } catch (const comm::CommError&) {
        work.cancel();  // no thread stays blocked on it
        throw;
      }
      if (Clock::now() >= deadline) {
        work.cancel();
        throw comm::CommTimeout("timed out after " + seconds(limit_s));
      }
    }
    work.wait(limit_s);  // completed: raises its error, if any
  } catch (const comm::CommTimeout& e) {
    throw comm::CommTimeout(what + ": " + e.what());
  } catch (const comm::CommError& e) {
    try {
      board_.check(true);  // a peer's posted error explains ours
    } catch (const comm::CommError& posted) {
      throw comm::CommError(what + ": a stage reported: " + posted.what());
    }
    throw comm::CommError(what + ": " + e.what());
  }
}

at::Tensor StageLink::wait(PostedRecv& r, double timeout_s) {
  TORCH_CHECK(!r.taken, "tandem.comm.StageLink (", r.what, "): this receive was already waited for");
  Direction& d = r.direction == 0 ? recv_fwd_ : recv_bwd_;
  const auto deadline = deadline_after(timeout_s);
  try {
    if (!r.work && !d.failed.empty())  // the failure dropped it from the queue
      throw comm::CommError(r.what + ": an earlier receive failed (" + d.failed + ")");
    progress(d);
    while (!r.work) {  // queued: the head of the queue waits for its header
      TORCH_INTERNAL_ASSERT(!d.queued.empty(), r.what, ": a queued receive left the queue");
      PostedRecv& head = *d.queued.front();
      await(*head.header_work, head.what, timeout_s, deadline, /*host=*/true);
      progress(d);
    }
    await(*r.work, r.what, timeout_s, deadline, /*host=*/device_.is_cpu());
#ifdef TANDEM_WITH_CUDA
    if (device_.is_cuda()) {
      // the buffer belongs to the comm stream; the caller's stream (now ordered after the
      // receive) reads it: the allocator must not reuse it before that stream is done
      c10::cuda::CUDACachingAllocator::recordStream(r.buf.storage().data_ptr(),
                                                    c10::cuda::getCurrentCUDAStream(device_.index()));
    }
#endif
  } catch (const std::exception& e) {
    r.taken = true;
    fail(d, e.what());  // cancels the direction's other receives: their order is lost
    throw;
  }
  r.taken = true;
  r.work.reset();
  return std::move(r.buf);
}

at::Tensor StageLink::recv_forward(std::optional<double> timeout_s) {
  return irecv_forward()->wait(timeout_s);
}

at::Tensor StageLink::recv_backward(std::optional<double> timeout_s) {
  return irecv_backward()->wait(timeout_s);
}

at::Tensor StageLink::send_forward_recv_backward(const at::Tensor& activation, std::optional<double> timeout_s) {
  require_peer(recv_bwd_);
  post_send(send_fwd_, activation);  // a bad tensor raises before anything is posted
  return irecv_backward()->wait(timeout_s);
}

at::Tensor StageLink::send_backward_recv_forward(const at::Tensor& grad, std::optional<double> timeout_s) {
  require_peer(recv_fwd_);
  post_send(send_bwd_, grad);
  return irecv_forward()->wait(timeout_s);
}

}  // namespace tandem::p2p
