#pragma once
// ErrorBoard: one key in the job's c10d store where a failing stage writes its error and
// every waiting stage reads it, so a receiver learns why its peer stopped (a static-shape
// mismatch, an exception in the peer's stage) instead of waiting for its timeout. Reads are
// rate-limited (one store round trip per kCheckInterval); the store is best effort: if it
// is unreachable, waits still end at their timeout.
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <string>

namespace tandem::p2p {

class ErrorBoard {
 public:
  static constexpr std::chrono::milliseconds kCheckInterval{20};

  ErrorBoard() = default;  // no store: checks only what this process posted
  ErrorBoard(c10::intrusive_ptr<c10d::Store> store, std::string key);

  // Records the first failure for every rank to see.
  void post(const std::string& message);
  // Throws CommError(the posted message) when some rank posted one; reads the store at most
  // once per kCheckInterval unless `force`.
  void check(bool force);
  const std::string& key() const { return key_; }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
  std::string key_;
  std::string error_;
  std::chrono::steady_clock::time_point next_check_{};
};

}  // namespace tandem::p2p
