// ErrorBoard: see error_board.h.
#include "p2p/error_board.h"

#include "comm/errors.h"

namespace tandem::p2p {

ErrorBoard::ErrorBoard(c10::intrusive_ptr<c10d::Store> store, std::string key)
    : store_(std::move(store)), key_(std::move(key)) {}

void ErrorBoard::post(const std::string& message) {
  if (error_.empty()) error_ = message;
  if (!store_) return;
  try {
    // first writer wins: "" means "no value yet"
    store_->compareSet(key_, std::vector<uint8_t>{}, std::vector<uint8_t>(message.begin(), message.end()));
  } catch (const std::exception&) {  // best effort: the poster raises its own error anyway
  }
}

void ErrorBoard::check(bool force) {
  if (!error_.empty()) throw comm::CommError(error_);
  if (!store_) return;
  const auto now = std::chrono::steady_clock::now();
  if (!force && now < next_check_) return;
  next_check_ = now + kCheckInterval;
  std::vector<uint8_t> value;
  try {
    if (!store_->check({key_})) return;
    value = store_->get(key_);
  } catch (const std::exception&) {  // unreachable store: the wait's own timeout still holds
    return;
  }
  if (value.empty()) return;
  error_.assign(value.begin(), value.end());
  throw comm::CommError(error_);
}

}  // namespace tandem::p2p
