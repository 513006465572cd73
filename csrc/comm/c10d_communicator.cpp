// The c10d backend of Communicator. Collectives and p2p are posted asynchronously on the
// ProcessGroup (gloo runs them on its worker threads); C10dWork waits with a timeout and
// turns c10d's errors into CommError / CommTimeout naming this rank, the peer, the operation.
#include "comm/c10d_communicator.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "comm/errors.h"
#include "comm/wait_watch.h"

namespace tandem::comm {

namespace {

using Clock = std::chrono::steady_clock;

std::chrono::milliseconds to_ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0 + 0.5));
}

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return c10d::ReduceOp::SUM;
    case ReduceOp::kProduct: return c10d::ReduceOp::PRODUCT;
    case ReduceOp::kMax: return c10d::ReduceOp::MAX;
    case ReduceOp::kMin: return c10d::ReduceOp::MIN;
  }
  return c10d::ReduceOp::SUM;
}

}  // namespace

// The outcome of one send/recv, filled in by its P2PWaitQueue's thread.
struct P2PWaiter {
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  bool ok = false;
  std::string error;
};

// Gloo reports a send/recv complete only once someone waited for it, and gloo's own timeout
// on such a wait closes every connection of the group. So each (communicator, peer, kind)
// has one long-lived thread that waits for its operations without a timeout, in posting
// order (gloo matches and completes them in that order); our deadline only stops the
// caller's wait. An operation past its deadline stays posted (parked), never aborted: gloo
// would keep an aborted receive registered, and the late message would then stop the
// connection (see C10dWork::cancel).
class P2PWaitQueue {
 public:
  P2PWaitQueue() = default;
  P2PWaitQueue(const P2PWaitQueue&) = delete;
  P2PWaitQueue& operator=(const P2PWaitQueue&) = delete;

  static std::shared_ptr<P2PWaitQueue> start() {
    auto q = std::make_shared<P2PWaitQueue>();
    std::thread([q] { q->run(); }).detach();  // holds q: ends when stopped and drained
    return q;
  }

  std::shared_ptr<P2PWaiter> add(c10::intrusive_ptr<c10d::Work> work) {
    auto waiter = std::make_shared<P2PWaiter>();
    {
      std::lock_guard<std::mutex> lock(mu_);
      items_.emplace_back(std::move(work), waiter);
    }
    cv_.notify_one();
    return waiter;
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
  }

 private:
  void run() {
    while (true) {
      std::pair<c10::intrusive_ptr<c10d::Work>, std::shared_ptr<P2PWaiter>> item;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !items_.empty(); });
        if (items_.empty()) return;  // stopped and drained
        item = std::move(items_.front());
        items_.pop_front();
      }
      bool ok = false;
      std::string error;
      try {
        ok = item.first->wait();
      } catch (const std::exception& e) {
        error = e.what();
      }
      P2PWaiter& w = *item.second;
      std::lock_guard<std::mutex> lock(w.mu);
      w.finished = true;
      w.ok = ok;
      w.error = error;
      w.cv.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<c10::intrusive_ptr<c10d::Work>, std::shared_ptr<P2PWaiter>>> items_;
  bool stop_ = false;
};

namespace {

class C10dWork final : public Work {
 public:
  // waits: the queue that waits for a send/recv (nullptr for a collective); aborted: the
  // communicator's flag (abort() from any thread ends the waits in progress)
  C10dWork(c10::intrusive_ptr<c10d::Work> work, std::string what, double timeout_s, P2PWaitQueue* waits,
           std::shared_ptr<const std::atomic<bool>> aborted)
      : Work(std::move(what), timeout_s),
        work_(std::move(work)),
        waiter_(waits ? waits->add(work_) : nullptr),
        aborted_(std::move(aborted)) {}

  void wait(std::optional<double> timeout_s) override { synchronize(timeout_s); }

  void synchronize(std::optional<double> timeout_s) override {
    if (!error_.empty()) throw_error();
    if (done_) return;
    const double limit = timeout_or_default(timeout_s);
    if (waiter_) {
      wait_p2p(limit);
    } else {
      wait_collective(limit);
    }
    done_ = true;
  }

  // Finished (successfully or not), or given up on: the communicator was aborted.
  bool is_completed() override { return finished() || aborted(); }

  bool wait_for(double timeout_s) override {
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(timeout_s));
    while (!is_completed()) {  // in slices: an abort from another thread ends the wait
      const auto left = deadline - Clock::now();
      if (left <= Clock::duration::zero()) return false;
      const auto slice = std::min<Clock::duration>(left, kSlice);
      if (!waiter_) {
        // a collective: c10d's wait with a timeout raises when it expires without disturbing
        // the operation (and raises a failed one's error: then it is completed too). Some
        // works (gloo's reduce_scatter) complete through their wait and never report
        // isCompleted(): a wait that returns is the completion.
        try {
          if (work_->wait(std::max(std::chrono::duration_cast<std::chrono::milliseconds>(slice),
                                   std::chrono::milliseconds(1))))
            returned_ = true;
        } catch (const std::exception&) {
        }
      } else {
        std::unique_lock<std::mutex> lock(waiter_->mu);
        waiter_->cv.wait_for(lock, slice, [&] { return waiter_->finished; });
      }
    }
    return true;
  }

  // Parks the operation: gloo keeps it registered on the connection even when aborted, and
  // a message that arrives for a freed buffer stops that connection's reader for good. So
  // the operation stays posted, its buffer alive (the wait queue holds the work), and a late
  // message lands in it harmlessly; the queue's thread moves on when it completes or the
  // group is destroyed.
  void cancel() override {}

 private:
  static constexpr std::chrono::milliseconds kSlice{20};

  bool aborted() const { return aborted_ && aborted_->load(); }

  // The operation itself ended (successfully or not), or this work already raised.
  bool finished() {
    if (done_ || !error_.empty()) return true;
    if (!waiter_) return returned_ || work_->isCompleted();
    std::lock_guard<std::mutex> lock(waiter_->mu);
    return waiter_->finished;
  }

  // A collective runs on a gloo worker thread; we wait for it in slices (Work::wait with a
  // timeout does not disturb it), checking for an abort and, under a WaitWatch, the watch.
  void wait_collective(double limit) {
    const WaitWatch* watch = current_wait_watch();
    if (watch) limit = std::min(limit, watch->timeout_s);
    const auto start = Clock::now();
    while (!wait_for(std::chrono::duration<double>(kSlice).count())) {
      if (watch) {
        try {
          watch->check();
        } catch (const std::exception& e) {
          error_ = what() + ": stopped waiting: " + first_line(e.what());
          throw CommError(error_);
        }
      }
      if (std::chrono::duration<double>(Clock::now() - start).count() >= limit) fail(true, "", limit);
    }
    if (!finished()) fail(false, "the communicator was aborted", limit);
    bool ok = false;
    try {
      ok = work_->wait(to_ms(limit));  // completed: returns at once, or raises its error
    } catch (const std::exception& e) {
      const double waited = std::chrono::duration<double>(Clock::now() - start).count();
      // c10d reports a timeout as an ordinary error: tell it apart by the time it took.
      fail(waited >= 0.95 * limit, e.what(), limit);
    }
    if (!ok) fail(false, "the operation was aborted", limit);
  }

  void wait_p2p(double limit) {
    if (!wait_for(limit)) fail(true, "", limit);  // the operation stays parked (see cancel)
    if (!finished()) fail(false, "the communicator was aborted", limit);
    std::unique_lock<std::mutex> lock(waiter_->mu);
    const bool ok = waiter_->ok;
    const std::string error = waiter_->error;
    lock.unlock();
    if (!error.empty()) fail(false, error, limit);
    if (!ok) fail(false, "the operation was aborted", limit);
  }

  [[noreturn]] void fail(bool timed_out, const std::string& cause, double limit) {
    timed_out_ = timed_out;
    error_ = timed_out ? what() + ": timed out after " + format_seconds(limit)
                       : what() + ": failed: " + first_line(cause);
    throw_error();
  }

  [[noreturn]] void throw_error() const {
    if (timed_out_) throw CommTimeout(error_);
    throw CommError(error_);
  }

  static std::string format_seconds(double s) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.3g s", s);
    return buf;
  }

  static std::string first_line(const std::string& s) {
    auto n = s.find('\n');
    return n == std::string::npos ? s : s.substr(0, n);
  }

  c10::intrusive_ptr<c10d::Work> work_;
  std::shared_ptr<P2PWaiter> waiter_;  // set for send/recv
  std::shared_ptr<const std::atomic<bool>> aborted_;
  bool returned_ = false;  // a collective's wait returned: it completed successfully
  bool done_ = false;
  bool timed_out_ = false;
  std::string error_;
};

}  // namespace

C10dCommunicator::C10dCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> pg, at::Device device,
                                   double timeout_s)
    : C10dCommunicator(pg, device, timeout_s, 0, std::make_shared<std::atomic<int>>(1)) {}

C10dCommunicator::C10dCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> pg, at::Device device,
                                   double timeout_s, int tag, std::shared_ptr<std::atomic<int>> next_tag)
    : Communicator(pg ? pg->getRank() : 0, pg ? pg->getSize() : 1, device, timeout_s),
      pg_(std::move(pg)),
      tag_(tag),
      next_tag_(std::move(next_tag)) {
  TORCH_CHECK_VALUE(pg_, "tandem.comm: the process group is None");
}

CommunicatorPtr C10dCommunicator::fork(std::optional<double> timeout_s) {
  check_alive(who() + ": fork");
  return CommunicatorPtr(new C10dCommunicator(pg_, device(), timeout_s.value_or(this->timeout_s()),
                                              next_tag_->fetch_add(1), next_tag_));
}

C10dCommunicator::~C10dCommunicator() {
  std::lock_guard<std::mutex> lock(waits_mu_);
  for (auto& [key, q] : waits_) q->stop();  // each thread ends once its last wait returned
}

P2PWaitQueue& C10dCommunicator::waits(int peer, P2PKind kind) {
  std::lock_guard<std::mutex> lock(waits_mu_);
  auto& q = waits_[{peer, kind == P2PKind::kSend}];
  if (!q) q = P2PWaitQueue::start();
  return *q;
}

void C10dCommunicator::abort() { *aborted_ = true; }

void C10dCommunicator::close(std::optional<double>) { closed_ = true; }

void C10dCommunicator::check_alive(const std::string& what) const {
  if (*aborted_) throw CommError(what + ": the communicator was aborted");
  if (closed_) throw CommError(what + ": the communicator was closed");
}

std::chrono::milliseconds C10dCommunicator::timeout_ms() const { return to_ms(timeout_s()); }

WorkPtr C10dCommunicator::do_all_reduce(const at::Tensor& t, ReduceOp op, std::string what) {
  check_alive(what);
  std::vector<at::Tensor> tensors{t};
  c10d::AllreduceOptions opts;
  opts.reduceOp = to_c10d(op);
  opts.timeout = timeout_ms();  // gloo's own timeout too: a stuck worker thread gives up
  // t [n...] -> t [n...] reduced over the group, in place
  return std::make_shared<C10dWork>(pg_->allreduce(tensors, opts), std::move(what), timeout_s(), nullptr, aborted_);
}

// _allgather_base / _reduce_scatter_base are the names that every supported torch has
// (newer ones alias them to all_gather_single / reduce_scatter_single).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
WorkPtr C10dCommunicator::do_all_gather(const at::Tensor& out, const at::Tensor& in, std::string what) {
  check_alive(what);
  at::Tensor o = out, i = in;
  c10d::AllgatherOptions opts;
  opts.timeout = timeout_ms();
  // in [n0, ...] on each rank -> out [size * n0, ...]
  return std::make_shared<C10dWork>(pg_->_allgather_base(o, i, opts), std::move(what), timeout_s(), nullptr, aborted_);
}

WorkPtr C10dCommunicator::do_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op,
                                            std::string what) {
  check_alive(what);
  at::Tensor o = out, i = in;
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = to_c10d(op);
  opts.timeout = timeout_ms();
  // in [size * n0, ...] reduced over the group -> out [n0, ...], this rank's block
  return std::make_shared<C10dWork>(pg_->_reduce_scatter_base(o, i, opts), std::move(what), timeout_s(), nullptr, aborted_);
}
#pragma GCC diagnostic pop

std::vector<WorkPtr> C10dCommunicator::do_batch_p2p(const std::vector<P2POp>& ops,
                                                    const std::vector<std::string>& whats) {
  check_alive(whats.front());
  std::vector<WorkPtr> works(ops.size());
  // Sends to this rank pair with recvs from it, in order: a local copy.
  std::vector<size_t> self_sends;
  for (size_t i = 0; i < ops.size(); ++i)
    if (ops[i].peer == rank() && ops[i].kind == P2PKind::kSend) self_sends.push_back(i);
  size_t next_self = 0;
  for (size_t i = 0; i < ops.size(); ++i) {
    if (ops[i].peer != rank() || ops[i].kind != P2PKind::kRecv) continue;
    const size_t s = self_sends[next_self++];
    ops[i].tensor.copy_(ops[s].tensor);
    works[i] = std::make_shared<CompletedWork>(whats[i]);
    works[s] = std::make_shared<CompletedWork>(whats[s]);
  }
  // gloo posts both kinds without blocking; recvs first so the buffers are ready.
  for (P2PKind kind : {P2PKind::kRecv, P2PKind::kSend}) {
    for (size_t i = 0; i < ops.size(); ++i) {
      if (ops[i].kind != kind || works[i]) continue;
      std::vector<at::Tensor> tensors{ops[i].tensor};
      auto w = kind == P2PKind::kSend ? pg_->send(tensors, ops[i].peer, tag_) : pg_->recv(tensors, ops[i].peer, tag_);
      works[i] = std::make_shared<C10dWork>(std::move(w), whats[i], timeout_s(), &waits(ops[i].peer, kind), aborted_);
    }
  }
  return works;
}

}  // namespace tandem::comm
