#pragma once
// Work: the handle of one in-flight communication operation.
#include <memory>
#include <optional>
#include <string>

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
};

}  // namespace tandem::comm
