#pragma once
// Work: the handle of one in-flight communication operation.
#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>

namespace tandem::comm {

class Work {
 public:
  explicit Work(std::string what, double default_timeout_s)
      : what_(std::move(what)), default_timeout_s_(default_timeout_s) {}
  virtual ~Work() = default;
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;

  // Orders what follows after this operation. CPU: the host blocks until it completes (at
  // most timeout_s, default: the communicator's timeout). CUDA: the caller's current stream
  // waits for it and the host returns at once; the communicator's watchdog enforces the
  // timeout and the next call on it raises. Raises CommTimeout / CommError.
  virtual void wait(std::optional<double> timeout_s) = 0;
  // Blocks the host until the operation completed (at most timeout_s), on every backend.
  virtual void synchronize(std::optional<double> timeout_s) = 0;
  // Non-blocking: has the operation finished (successfully or not)?
  virtual bool is_completed() = 0;
  // Blocks the host for at most timeout_s; returns is_completed(). Never raises, never
  // disturbs the operation: a caller waits in slices and checks other things in between.
  virtual bool wait_for(double timeout_s);
  // The caller gives up on the operation. c10d: it stays posted with its buffer (a late
  // message lands there; aborting it in gloo would stop the connection); NCCL: nothing, the
  // communicator's watchdog owns its deadline.
  virtual void cancel() {}

  // "rank 1 of 4: all_reduce of float[8, 16]" (what the error messages say).
  const std::string& what() const { return what_; }

 protected:
  double timeout_or_default(std::optional<double> timeout_s) const {
    return timeout_s.value_or(default_timeout_s_);
  }

 private:
  std::string what_;
  double default_timeout_s_;
};

using WorkPtr = std::shared_ptr<Work>;

// An operation that completed when it was issued (a local copy, an empty tensor).
class CompletedWork final : public Work {
 public:
  explicit CompletedWork(std::string what) : Work(std::move(what), 0.0) {}
  void wait(std::optional<double>) override {}
  void synchronize(std::optional<double>) override {}
  bool is_completed() override { return true; }
  bool wait_for(double) override { return true; }
};

inline bool Work::wait_for(double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  auto pause = std::chrono::microseconds(2);
  while (!is_completed()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(500));
  }
  return true;
}

}  // namespace tandem::comm
