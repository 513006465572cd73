#pragma once
// A world of ranks as threads of one test process: each rank has its own ProcessGroupGloo
// (over loopback) on one shared HashStore, so the sanitizers see every thread of the
// communication runtime, gloo's included.
#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/c10d_communicator.h"

namespace tandem::testing {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// A ProcessGroup with one gloo backend (over loopback) for rank `rank` of `size`
// (collective: every rank builds its own, with the same store). gloo_timeout_s: gloo's own
// limit on an operation. In gloo_group.cpp, the one file that needs gloo's headers.
c10::intrusive_ptr<c10d::ProcessGroup> gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                                  double gloo_timeout_s);

// What a rank's body gets: its rank, the world size, its group and a store for side
// channels (error boards), shared by all ranks.
struct Rank {
  int rank;
  int size;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  c10::intrusive_ptr<c10d::Store> store;

  comm::CommunicatorPtr communicator(double timeout_s) const {
    return std::make_shared<comm::C10dCommunicator>(pg, at::Device(at::kCPU), timeout_s);
  }
  // Every rank waits here (on the store, not the group: works after a group failed).
  void barrier(const std::string& name) const {
    const std::string key = "barrier/" + name;
    store->add(key, 1);
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (store->add(key, 0) < size) {
      if (Clock::now() > deadline) throw std::runtime_error("barrier " + name + ": timed out");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
};

// Runs body(rank) on `size` threads, each with a fresh gloo group. A rank's exception fails
// the test (gtest's EXPECT_* work from any thread). Never hangs: ranks that have not ended
// `limit_s` after the start make the process exit with a message naming them.
inline void run_ranks(int size, const std::function<void(const Rank&)>& body, double gloo_timeout_s = 30.0,
                      double limit_s = 60.0) {
  static std::atomic<int> world_counter{0};
  auto store = c10::make_intrusive<c10d::HashStore>();
  const std::string prefix = "world" + std::to_string(world_counter++);
  std::vector<std::future<void>> done;
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    std::packaged_task<void()> task([=, &body] {
      auto pg_store = c10::make_intrusive<c10d::PrefixStore>(prefix + "/pg", store);
      auto side = c10::make_intrusive<c10d::PrefixStore>(prefix + "/side", store);
      Rank rank{r, size, gloo_group(pg_store, r, size, gloo_timeout_s), side};
      body(rank);
    });
    done.push_back(task.get_future());
    threads.emplace_back(std::move(task));
  }
  const auto deadline = Clock::now() + std::chrono::duration<double>(limit_s);
  std::string late;
  for (int r = 0; r < size; ++r)
    if (done[r].wait_until(deadline) != std::future_status::ready) late += " " + std::to_string(r);
  if (!late.empty()) {
    std::fprintf(stderr, "run_ranks: rank(s)%s still running after %.0f s: giving up\n", late.c_str(), limit_s);
    std::fflush(stderr);
    std::_Exit(3);  // a hung thread cannot be joined; the test fails instead of hanging
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < size; ++r) {
    try {
      done[r].get();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "rank " << r << " of " << size << " raised: " << e.what();
    }
  }
}

// Expects `f` to throw E whose message contains every one of `parts`.
template <class E, class F>
void expect_throw_with(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "\"" << p << "\" not in: " << msg;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw another exception type: " << e.what();
    return;
  }
  ADD_FAILURE() << "did not throw";
}

}  // namespace tandem::testing
