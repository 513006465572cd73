// WaitWatch deadlines and checks on c10d collective waits, and the ErrorBoard they read.
#include <gtest/gtest.h>

#include "comm/errors.h"
#include "comm/wait_watch.h"
#include "p2p/error_board.h"
#include "world.h"

namespace tandem::comm {
namespace {

using p2p::ErrorBoard;
using testing::expect_throw_with;
using testing::Rank;
using testing::run_ranks;
using testing::seconds_since;

TEST(WaitWatch, ScopesNestPerThread) {
  EXPECT_EQ(current_wait_watch(), nullptr);
  {
    ScopedWaitWatch outer(WaitWatch{[] {}, 1.0});
    ASSERT_NE(current_wait_watch(), nullptr);
    EXPECT_EQ(current_wait_watch()->timeout_s, 1.0);
    {
      ScopedWaitWatch inner(WaitWatch{[] {}, 2.0});
      EXPECT_EQ(current_wait_watch()->timeout_s, 2.0);
      std::thread([] { EXPECT_EQ(current_wait_watch(), nullptr); }).join();  // thread-local
    }
    EXPECT_EQ(current_wait_watch()->timeout_s, 1.0);
  }
  EXPECT_EQ(current_wait_watch(), nullptr);
}

// Rank 1 joins the all_reduce only after rank 0 gave up on it (so the collective completes and
// the group stays usable): rank 0's wait ends at the watch's deadline, not the communicator's.
TEST(WaitWatch, TheWatchsDeadlineEndsACollectiveWait) {
  run_ranks(2, [](const Rank& r) {
    auto c = r.communicator(30.0);
    at::Tensor t = at::ones({4});
    if (r.rank == 0) {
      WorkPtr w = c->all_reduce(t, ReduceOp::kSum);
      const auto start = testing::Clock::now();
      {
        ScopedWaitWatch watch(WaitWatch{[] {}, 0.3});
        expect_throw_with<CommTimeout>([&] { w->wait(std::nullopt); },
                                       {"rank 0 of 2: all_reduce(sum) of float32[4]", "timed out after 0.3 s"});
      }
      const double waited = seconds_since(start);
      EXPECT_GE(waited, 0.29);
      EXPECT_LT(waited, 5.0);
      r.barrier("gave_up");
    } else {
      r.barrier("gave_up");
      c->all_reduce(t, ReduceOp::kSum)->wait(std::nullopt);
      EXPECT_TRUE(at::equal(t, at::full({4}, 2.0)));
    }
    // a wait without a watch takes the communicator's timeout and succeeds
    at::Tensor u = at::ones({2});
    c->all_reduce(u, ReduceOp::kSum)->wait(std::nullopt);
    EXPECT_TRUE(at::equal(u, at::full({2}, 2.0)));
  });
}

// Rank 1 posts a failure on the error board; rank 0, waiting under a watch that reads the
// board, stops with that message long before any timeout.
TEST(WaitWatch, AFailurePostedOnTheBoardStopsTheWait) {
  run_ranks(2, [](const Rank& r) {
    auto c = r.communicator(30.0);
    ErrorBoard board(r.store, "failures");
    at::Tensor t = at::ones({3});
    if (r.rank == 0) {
      WorkPtr w = c->all_reduce(t, ReduceOp::kSum);
      const auto start = testing::Clock::now();
      {
        ScopedWaitWatch watch(WaitWatch{[&board] { board.check(false); }, 20.0});
        r.barrier("watching");
        expect_throw_with<CommError>([&] { w->wait(std::nullopt); },
                                     {"rank 0 of 2: all_reduce(sum) of float32[3]: stopped waiting: stage 1 failed: boom"});
      }
      EXPECT_LT(seconds_since(start), 5.0);
      r.barrier("stopped");
    } else {
      r.barrier("watching");
      board.post("stage 1 failed: boom");
      r.barrier("stopped");
      c->all_reduce(t, ReduceOp::kSum)->wait(std::nullopt);  // completes the pending collective
    }
  });
}

TEST(ErrorBoard, TheFirstPostWinsAndEveryReaderSeesIt) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  ErrorBoard a(store, "k"), b(store, "k"), other(store, "other");
  EXPECT_NO_THROW(a.check(true));
  b.post("first");
  a.post("second");  // a raises its own error locally, the store keeps the first
  expect_throw_with<CommError>([&] { a.check(false); }, {"second"});
  ErrorBoard c(store, "k");
  expect_throw_with<CommError>([&] { c.check(true); }, {"first"});
  EXPECT_NO_THROW(other.check(true));
  EXPECT_EQ(c.key(), "k");
}

TEST(ErrorBoard, ReadsAreRateLimitedUnlessForced) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  ErrorBoard reader(store, "k"), writer(store, "k");
  const auto t0 = testing::Clock::now();
  reader.check(false);  // reads now; the next read is due one interval later
  const auto t1 = testing::Clock::now();
  writer.post("late");
  const auto t2 = testing::Clock::now();
  bool seen = false;
  try {
    reader.check(false);
  } catch (const CommError&) {
    seen = true;
  }
  const auto t3 = testing::Clock::now();
  if (seen) {
    EXPECT_GE(t3 - t0, ErrorBoard::kCheckInterval) << "read the store within the interval";
  } else {
    EXPECT_LT(t2 - t1, ErrorBoard::kCheckInterval) << "did not read the store after the interval";
  }
  expect_throw_with<CommError>([&] { reader.check(true); }, {"late"});
  ErrorBoard local;  // no store: only what this process posted
  EXPECT_NO_THROW(local.check(true));
  local.post("mine");
  expect_throw_with<CommError>([&] { local.check(false); }, {"mine"});
}

}  // namespace
}  // namespace tandem::comm
