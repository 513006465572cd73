#pragma once
// WaitWatch: a watch over this thread's host waits for c10d (gloo) collectives. While one is
// installed (ScopedWaitWatch), such a wait also ends when `check` raises (e.g. an error board
// on which a peer posted its failure: the CommError names it) or after `timeout_s`,
// whichever comes first, instead of waiting for the communicator's own timeout. A pipeline
// step installs one, so that a TP collective inside a stage stops when a peer failed.
// CUDA waits order streams and never block the host: the watch does not apply to them.
#include <functional>

namespace tandem::comm {

struct WaitWatch {
  std::function<void()> check;  // throws to stop the wait
  double timeout_s;
};

// The innermost watch installed on this thread, or nullptr.
const WaitWatch* current_wait_watch();

class ScopedWaitWatch {
 public:
  explicit ScopedWaitWatch(WaitWatch watch);
  ~ScopedWaitWatch();
  ScopedWaitWatch(const ScopedWaitWatch&) = delete;
  ScopedWaitWatch& operator=(const ScopedWaitWatch&) = delete;

 private:
  WaitWatch watch_;
  const WaitWatch* previous_;
};

}  // namespace tandem::comm
