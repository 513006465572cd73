// WaitWatch: see wait_watch.h.
#include "comm/wait_watch.h"

namespace tandem::comm {

namespace {
thread_local const WaitWatch* current = nullptr;
}  // namespace

const WaitWatch* current_wait_watch() { return current; }

ScopedWaitWatch::ScopedWaitWatch(WaitWatch watch) : watch_(std::move(watch)), previous_(current) {
  current = &watch_;
}

ScopedWaitWatch::~ScopedWaitWatch() { current = previous_; }

}  // namespace tandem::comm
