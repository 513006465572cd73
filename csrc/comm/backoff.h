#pragma once
// Backoff: how a host poll waits between two looks. For the first `spin` it yields the core
// between looks (sched_yield), then sleeps 1, 2, 4, ... microseconds up to `max_sleep`. A
// sleep of 1 us costs ~55 us under Linux's default timer slack (50 us), so a condition that
// turns true within tens of microseconds (NCCL's non-blocking enqueue) is caught by the
// spin, and a long wait still costs no CPU. Yielding, not a pause-spin: NCCL 2.30.7 launches
// each non-blocking group on a thread of its own, which a pause-spin keeps off the core when
// cores are scarce (measured: benchmarks/RESULTS.md, "NCCL enqueue: host time per post").
#include <algorithm>
#include <chrono>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace tandem::comm {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::this_thread::yield();
#endif
}

class Backoff {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::microseconds kDefaultSpin{50};

  explicit Backoff(std::chrono::nanoseconds spin = kDefaultSpin,
                   std::chrono::microseconds max_sleep = std::chrono::microseconds(1000))
      : spin_until_(Clock::now() + spin), max_sleep_(max_sleep) {}

  void pause() {
    if (Clock::now() < spin_until_) {
      std::this_thread::yield();  // a runnable thread of this core (NCCL's launcher) goes first
      return;
    }
    std::this_thread::sleep_for(sleep_);
    sleep_ = std::min(sleep_ * 2, max_sleep_);
  }

 private:
  Clock::time_point spin_until_;
  std::chrono::microseconds max_sleep_;
  std::chrono::microseconds sleep_{1};
};

}  // namespace tandem::comm
