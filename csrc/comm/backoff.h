#pragma once
// Backoff: how a host poll waits between two looks. It spins (with the CPU's pause hint) for
// the first `spin`, then sleeps 1, 2, 4, ... microseconds up to `max_sleep`. A sleep of
// 1 us costs ~55 us under Linux's default timer slack (50 us), so a condition that turns
// true within a few microseconds (NCCL's non-blocking enqueue) is caught by the spin, and a
// long wait still costs no CPU.
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
      for (int i = 0; i < 16; ++i) cpu_relax();  // ~0.1-1 us between two looks
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
