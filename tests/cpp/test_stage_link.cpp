// StageLink on the c10d Communicator over gloo, ranks as threads: static shapes along a
// pipeline (buffers reused), dynamic shapes around even and odd rings, receives posted
// early and waited out of order, the error board carrying a sender's error to its
// receiver, abort from another thread, and a peer that dies.
#include <gtest/gtest.h>

#include <set>

#include "comm/errors.h"
#include "p2p/stage_link.h"
#include "world.h"

namespace tandem::p2p {
namespace {

using comm::CommError;
using comm::CommTimeout;
using testing::expect_throw_with;
using testing::Rank;
using testing::run_ranks;
using testing::seconds_since;

std::optional<int> before(const Rank& r) { return r.rank == 0 ? std::nullopt : std::optional<int>(r.rank - 1); }
std::optional<int> after(const Rank& r) {
  return r.rank == r.size - 1 ? std::nullopt : std::optional<int>(r.rank + 1);
}

std::shared_ptr<StageLink> link(const Rank& r, std::optional<int> prev, std::optional<int> next, ShapeMode mode,
                                double timeout_s = 30.0, const std::string& board = "board") {
  return std::make_shared<StageLink>(r.communicator(timeout_s), prev, next, mode, timeout_s, ErrorBoard(r.store, board));
}

// A tensor of sender/step-dependent shape and dtype that the receiver recomputes.
at::Tensor payload(int sender, int step, int salt = 0) {
  at::Generator g = at::detail::createCPUGenerator(7919 * sender + 31 * step + salt);
  const int64_t ndim = at::randint(0, 5, {1}, g, at::kLong).item<int64_t>();
  std::vector<int64_t> shape;
  for (int64_t i = 0; i < ndim; ++i) shape.push_back(at::randint(0, 6, {1}, g, at::kLong).item<int64_t>());
  const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kLong, at::kDouble};
  const at::ScalarType dtype = dtypes[at::randint(0, 4, {1}, g, at::kLong).item<int64_t>()];
  return at::randint(-100, 100, shape, g, at::kLong).to(dtype);
}

void expect_same(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  EXPECT_EQ(got.scalar_type(), want.scalar_type()) << what;
  EXPECT_EQ(got.sizes(), want.sizes()) << what;
  if (got.scalar_type() == want.scalar_type() && got.sizes() == want.sizes()) EXPECT_TRUE(at::equal(got, want)) << what;
}

// Stages 0 -> 1 -> ... -> n-1: the forward adds 1 per stage, the last stage sends 2*y back.
void static_pipeline(const Rank& r) {
  const bool first = r.rank == 0, last = r.rank == r.size - 1;
  auto l = link(r, before(r), after(r), ShapeMode::kStatic);
  EXPECT_EQ(l->stage(), r.rank);
  std::set<const void*> ptrs;
  for (int mb = 0; mb < 6; ++mb) {
    at::Tensor x = first ? at::full({3, 5}, static_cast<double>(mb)) : l->recv_forward(std::nullopt);
    if (!first) ptrs.insert(x.data_ptr());
    EXPECT_TRUE(at::equal(x, at::full({3, 5}, static_cast<double>(mb + r.rank)))) << "mb " << mb;
    at::Tensor y = x + 1;
    at::Tensor g = last ? 2 * y : l->send_forward_recv_backward(y, std::nullopt);
    EXPECT_TRUE(at::equal(g, at::full({3, 5}, 2.0 * (mb + r.size)))) << "mb " << mb;
    if (!first) l->send_backward(g);
  }
  l->wait_sends(std::nullopt);
  EXPECT_EQ(l->pending_sends(), 0u);
  if (!first) EXPECT_LT(ptrs.size(), 6u) << "receive buffers are reused once the caller let go of them";
}

TEST(StageLink, StaticPipelineOfFourStages) { run_ranks(4, static_pipeline); }

// Around a ring of n ranks (odd n uses a third fork for the wrap-around edge).
void dynamic_ring(const Rank& r) {
  const int prev = (r.rank + r.size - 1) % r.size, next = (r.rank + 1) % r.size;
  auto l = link(r, prev, next, ShapeMode::kDynamic);
  for (int step = 0; step < 5; ++step) {
    l->send_forward(payload(r.rank, step));
    expect_same(l->recv_forward(std::nullopt), payload(prev, step), "forward step " + std::to_string(step));
    l->send_backward(payload(r.rank, step, 1));
    expect_same(l->recv_backward(std::nullopt), payload(next, step, 1), "backward step " + std::to_string(step));
  }
  l->wait_sends(std::nullopt);
}

TEST(StageLink, DynamicShapesAroundRingsOfThreeAndFour) {
  run_ranks(3, dynamic_ring);
  run_ranks(4, dynamic_ring);
}

// Receives posted before anything was sent, waited out of order, in both modes.
void early_posted(const Rank& r) {
  for (ShapeMode mode : {ShapeMode::kStatic, ShapeMode::kDynamic}) {
    const bool first = r.rank == 0, last = r.rank == r.size - 1;
    auto l = link(r, before(r), after(r), mode);
    std::vector<std::shared_ptr<RecvHandle>> fwd, bwd;
    if (!first)
      for (int mb = 0; mb < 4; ++mb) fwd.push_back(l->irecv_forward());
    if (!last)
      for (int mb = 0; mb < 4; ++mb) bwd.push_back(l->irecv_backward());
    if (!first) EXPECT_FALSE(fwd[3]->is_completed());
    const at::Tensor base = at::arange(6.0).reshape({2, 3});
    std::vector<at::Tensor> xs(4);
    for (int mb = 3; mb >= 0; --mb) xs[mb] = first ? base + mb : fwd[mb]->wait(std::nullopt);  // newest first
    for (int mb = 0; mb < 4; ++mb) EXPECT_TRUE(at::equal(xs[mb], base + mb + r.rank)) << mb;
    if (!first) {
      EXPECT_TRUE(fwd[0]->is_completed());
      expect_throw_with<c10::Error>([&] { fwd[0]->wait(std::nullopt); }, {"already waited for"});
    }
    for (int mb = 0; mb < 4; ++mb)
      if (!last) l->send_forward(xs[mb] + 1);
    std::vector<at::Tensor> gs(4);
    for (int mb : {2, 0, 3, 1}) gs[mb] = last ? 2 * (xs[mb] + 1) : bwd[mb]->wait(std::nullopt);
    for (int mb = 0; mb < 4; ++mb) {
      EXPECT_TRUE(at::equal(gs[mb], 2 * (base + mb + r.size))) << mb;
      if (!first) l->send_backward(gs[mb]);
    }
    l->wait_sends(std::nullopt);
  }
}

// Expects `f` to raise a CommError other than a CommTimeout (the wait ended early, as it
// must) whose message holds every one of `parts`, within `limit_s` seconds.
template <class F>
void expect_early_error(F&& f, const std::vector<std::string>& parts, double limit_s = 5.0) {
  const auto start = testing::Clock::now();
  try {
    f();
    ADD_FAILURE() << "did not throw";
  } catch (const CommTimeout& e) {
    ADD_FAILURE() << "waited until the timeout: " << e.what();
  } catch (const CommError& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "\"" << p << "\" not in: " << msg;
  }
  EXPECT_LT(seconds_since(start), limit_s);
}

TEST(StageLink, EarlyPostedReceivesWaitedOutOfOrder) { run_ranks(3, early_posted); }

// A later tensor of another shape in static mode: the sender raises a clear error and posts
// it; the receiver learns it from the error board long before its timeout.
TEST(StageLink, TheErrorBoardCarriesTheSendersErrorToTheReceiver) {
  run_ranks(2, [](const Rank& r) {
    auto l = link(r, before(r), after(r), ShapeMode::kStatic);
    const std::string mismatch =
        "stage 0: send_forward to stage 1): tensor float32[3, 6] does not match the static shape agreed on first use, "
        "float32[3, 5]";
    if (r.rank == 0) {
      l->send_forward(at::zeros({3, 5}));
      l->wait_sends(std::nullopt);
      r.barrier("first");
      expect_throw_with<c10::ValueError>([&] { l->send_forward(at::zeros({3, 6})); }, {mismatch});
    } else {
      EXPECT_TRUE(at::equal(l->recv_forward(std::nullopt), at::zeros({3, 5})));
      r.barrier("first");
      expect_early_error([&] { l->recv_forward(20.0); },
                         {"stage 1: recv_forward from stage 0: a stage reported: ", mismatch});
      // the direction's order is lost: later receives say so at once
      expect_throw_with<CommError>([&] { l->recv_forward(0.5); }, {"an earlier receive failed"});
    }
    r.barrier("end");
  });
}

// Another thread aborts the link while this one waits for a receive that never comes: the
// wait ends at once with an error that says so, and later calls raise.
TEST(StageLink, AbortFromAnotherThreadEndsAWait) {
  run_ranks(2, [](const Rank& r) {
    auto l = link(r, before(r), after(r), ShapeMode::kDynamic);
    if (r.rank == 1) {
      std::thread aborter([l] {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        l->abort();
      });
      expect_early_error([&] { l->recv_forward(20.0); }, {"stage 1: recv_forward from stage 0", "aborted"});
      aborter.join();
      expect_throw_with<CommError>([&] { l->send_backward(at::zeros({2})); }, {"aborted"});
    }
    r.barrier("end");
  });
}

// Stage 0 ends (its thread returns, its group and link are destroyed) without sending: stage
// 1's receive fails with an error naming the operation instead of waiting out its timeout.
TEST(StageLink, APeerThatDiesMakesTheReceiverRaise) {
  run_ranks(2, [](const Rank& r) {
    auto l = link(r, before(r), after(r), ShapeMode::kDynamic, /*timeout_s=*/20.0);
    r.barrier("built");
    if (r.rank == 1) {
      const auto start = testing::Clock::now();
      expect_throw_with<CommError>([&] { l->recv_forward(std::nullopt); }, {"stage 1: recv_forward from stage 0"});
      EXPECT_LT(seconds_since(start), 15.0);
    }
  });
}

TEST(StageLink, BadArgumentsAreNamed) {
  run_ranks(2, [](const Rank& r) {
    auto c = r.communicator(30.0);
    expect_throw_with<c10::ValueError>([&] { parse_shape_mode("fixed"); }, {"shapes must be \"static\" or \"dynamic\""});
    expect_throw_with<c10::ValueError>([&] { StageLink(c, r.rank, std::nullopt, ShapeMode::kStatic, 30.0); },
                                       {"prev_rank=" + std::to_string(r.rank), "must be another rank of the group"});
    expect_throw_with<c10::ValueError>([&] { StageLink(c, std::nullopt, 2, ShapeMode::kStatic, 30.0); },
                                       {"next_rank=2", "must be another rank of the group"});
    expect_throw_with<c10::ValueError>([&] { StageLink(nullptr, std::nullopt, std::nullopt, ShapeMode::kStatic, 30.0); },
                                       {"the communicator is None"});
    auto lone = std::make_shared<StageLink>(c, std::nullopt, std::nullopt, ShapeMode::kDynamic, 30.0);
    expect_throw_with<c10::ValueError>([&] { lone->send_forward(at::zeros({2})); },
                                       {"send_forward: this is the last stage (next_rank is None)"});
    expect_throw_with<c10::ValueError>([&] { lone->recv_forward(std::nullopt); },
                                       {"recv_forward: this is the first stage (prev_rank is None)"});
    expect_throw_with<c10::ValueError>([&] { lone->send_forward_recv_backward(at::zeros({2}), std::nullopt); },
                                       {"recv_backward: this is the last stage"});
  });
}

}  // namespace
}  // namespace tandem::p2p
