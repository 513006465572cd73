// The c10d Communicator on ProcessGroupGloo, ranks as threads of this process: every
// collective and p2p against a reference computed locally, waits out of order, timeouts that
// name the rank, the peer and the operation, and a rank that stops answering.
#include <gtest/gtest.h>

#include "comm/errors.h"
#include "world.h"

namespace tandem::comm {
namespace {

using testing::expect_throw_with;
using testing::Rank;
using testing::run_ranks;
using testing::seconds_since;

// Rank-dependent values every rank can recompute (small integers: exact in every dtype).
at::Tensor data(int rank, at::IntArrayRef shape, at::ScalarType dtype, int salt = 0) {
  at::Generator g = at::detail::createCPUGenerator(1000 * rank + salt);
  return at::randint(-8, 9, shape, g, at::kLong).to(dtype);
}

void check_collectives(Communicator& c, int rank, int n) {
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kLong}) {
    // all_reduce: t [5, 3] summed over ranks, in place
    at::Tensor t = data(rank, {5, 3}, dtype);
    WorkPtr w = c.all_reduce(t, ReduceOp::kSum);
    w->wait(std::nullopt);
    EXPECT_TRUE(w->is_completed());
    at::Tensor sum = at::zeros({5, 3}, dtype);
    for (int r = 0; r < n; ++r) sum += data(r, {5, 3}, dtype);
    EXPECT_TRUE(at::equal(t, sum)) << "all_reduce " << dtype;

    // all_gather: [4, 3] per rank -> [n*4, 3], rank r's block at rows 4r
    at::Tensor in = data(rank, {4, 3}, dtype, 1);
    at::Tensor out = at::empty({n * 4, 3}, dtype);
    c.all_gather(out, in)->wait(std::nullopt);
    std::vector<at::Tensor> blocks;
    for (int r = 0; r < n; ++r) blocks.push_back(data(r, {4, 3}, dtype, 1));
    EXPECT_TRUE(at::equal(out, at::cat(blocks))) << "all_gather " << dtype;

    // reduce_scatter: [n*2, 3] per rank -> [2, 3], rank r keeps block r of the sum
    at::Tensor rs_in = data(rank, {n * 2, 3}, dtype, 2);
    at::Tensor rs_out = at::empty({2, 3}, dtype);
    c.reduce_scatter(rs_out, rs_in, ReduceOp::kSum)->wait(std::nullopt);
    at::Tensor total = at::zeros({n * 2, 3}, dtype);
    for (int r = 0; r < n; ++r) total += data(r, {n * 2, 3}, dtype, 2);
    EXPECT_TRUE(at::equal(rs_out, total.narrow(0, 2 * rank, 2))) << "reduce_scatter " << dtype;
  }
  for (ReduceOp op : {ReduceOp::kMax, ReduceOp::kMin, ReduceOp::kProduct}) {
    at::Tensor t = data(rank, {6}, at::kLong, 3);
    c.all_reduce(t, op)->wait(std::nullopt);
    std::vector<at::Tensor> all;
    for (int r = 0; r < n; ++r) all.push_back(data(r, {6}, at::kLong, 3));
    at::Tensor s = at::stack(all);
    at::Tensor want = op == ReduceOp::kMax ? s.amax(0) : op == ReduceOp::kMin ? s.amin(0) : s.prod(0);
    EXPECT_TRUE(at::equal(t, want)) << reduce_op_name(op);
  }
}

void check_out_of_order(Communicator& c, int rank, int n) {
  at::Tensor a = at::full({8}, static_cast<double>(rank));
  at::Tensor b_in = at::full({2}, static_cast<double>(rank)), b_out = at::empty({2 * n});
  at::Tensor c_in = at::ones({3 * n}), c_out = at::empty({3});
  std::vector<WorkPtr> works = {c.all_reduce(a, ReduceOp::kSum), c.all_gather(b_out, b_in),
                                c.reduce_scatter(c_out, c_in, ReduceOp::kSum)};
  for (auto it = works.rbegin(); it != works.rend(); ++it) (*it)->wait(std::nullopt);
  EXPECT_TRUE(at::equal(a, at::full({8}, n * (n - 1) / 2.0)));
  EXPECT_TRUE(at::equal(b_out, at::arange(n, at::kFloat).repeat_interleave(2)));
  EXPECT_TRUE(at::equal(c_out, at::full({3}, static_cast<double>(n))));
}

void check_p2p(Communicator& c, int rank, int n) {
  const int next = (rank + 1) % n, prev = (rank + n - 1) % n;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kLong}) {  // a ring in one batch
    at::Tensor got = at::empty({7}, dtype);
    auto works = c.batch_p2p({{P2PKind::kSend, data(rank, {7}, dtype, 4), next}, {P2PKind::kRecv, got, prev}});
    ASSERT_EQ(works.size(), 2u);
    for (auto it = works.rbegin(); it != works.rend(); ++it) (*it)->wait(std::nullopt);  // recv first
    EXPECT_TRUE(at::equal(got, data(prev, {7}, dtype, 4)));
  }
  // many messages in flight to one peer, waited newest first: they match in posting order
  std::vector<at::Tensor> bufs;
  std::vector<WorkPtr> recvs, sends;
  for (int i = 0; i < 8; ++i) {
    bufs.push_back(at::empty({i + 1}));
    recvs.push_back(c.recv(bufs.back(), prev));
    sends.push_back(c.send(at::full({i + 1}, 100.0 * rank + i), next));
  }
  for (int i = 7; i >= 0; --i) recvs[i]->wait(std::nullopt);
  for (auto& s : sends) s->wait(std::nullopt);
  for (int i = 0; i < 8; ++i) EXPECT_TRUE(at::equal(bufs[i], at::full({i + 1}, 100.0 * prev + i))) << i;
  // sends to this rank pair with recvs from it inside one batch: a local copy
  at::Tensor mine = at::arange(4.0) + rank, back = at::empty({4});
  for (auto& w : c.batch_p2p({{P2PKind::kSend, mine, rank}, {P2PKind::kRecv, back, rank}})) w->wait(std::nullopt);
  EXPECT_TRUE(at::equal(back, mine));
}

void check_bad_input(Communicator& c, int rank, int n) {
  at::Tensor t = at::zeros({4, 4});
  expect_throw_with<c10::ValueError>([&] { c.all_reduce(t.t().narrow(1, 0, 2), ReduceOp::kSum); },
                                     {"rank " + std::to_string(rank), "all_reduce", "contiguous"});
  expect_throw_with<c10::ValueError>([&] { parse_reduce_op("avg"); }, {"unknown reduce op \"avg\""});
  expect_throw_with<c10::ValueError>([&] { c.all_gather(at::zeros({n * 4 + 1, 4}), t); }, {"all_gather: out shape"});
  expect_throw_with<c10::TypeError>([&] { c.all_gather(at::zeros({n * 4, 4}, at::kDouble), t); }, {"dtype"});
  expect_throw_with<c10::ValueError>([&] { c.reduce_scatter(at::zeros({3, 4}), t, ReduceOp::kSum); },
                                     {"reduce_scatter: in shape"});
  expect_throw_with<c10::ValueError>([&] { c.send(t, n); }, {"peer rank " + std::to_string(n) + " is not in the group"});
  expect_throw_with<c10::ValueError>([&] { c.send(t, rank); }, {"send to this rank"});
  expect_throw_with<c10::ValueError>([&] { c.batch_p2p({{P2PKind::kSend, t, rank}}); }, {"sends to this rank"});
  expect_throw_with<c10::TypeError>([&] { c.all_reduce(at::zeros({2}, at::kBool), ReduceOp::kMax); },
                                    {"op max is not defined for bool tensors"});
}

// A recv whose peer does not send (yet) times out naming rank, peer and operation; it stays
// parked, so the late message lands in its buffer and the connection keeps working.
void check_recv_timeout(Communicator& c, const Rank& r) {
  auto side = c.fork(std::nullopt);  // its own tag: nothing else can match this recv
  EXPECT_EQ(side->timeout_s(), c.timeout_s());
  EXPECT_EQ(c.fork(7.5)->timeout_s(), 7.5);
  at::Tensor late = at::empty({3});
  if (r.rank == 0) {
    WorkPtr w = side->recv(late, 1);
    const auto start = testing::Clock::now();
    EXPECT_FALSE(w->wait_for(0.05));  // rank 1 sends only after the barrier below
    expect_throw_with<CommTimeout>([&] { w->wait(0.3); },
                                   {"rank 0 of " + std::to_string(r.size) + ": recv of float32[3] from rank 1",
                                    "timed out after 0.3 s"});
    EXPECT_GE(seconds_since(start), 0.3);
    expect_throw_with<CommTimeout>([&] { w->wait(5.0); }, {"timed out"});  // the error sticks
  }
  r.barrier("recv_timeout");
  if (r.rank == 1) side->send(at::ones({3}), 0)->wait(std::nullopt);  // the late message
  if (r.rank <= 1) {                                                  // the same two ranks still talk
    const int other = 1 - r.rank;
    at::Tensor got = at::empty({4});
    for (auto& w : c.batch_p2p({{P2PKind::kSend, at::full({4}, static_cast<double>(r.rank)), other},
                                {P2PKind::kRecv, got, other}}))
      w->wait(20.0);
    EXPECT_TRUE(at::equal(got, at::full({4}, static_cast<double>(other))));
  }
  r.barrier("recv_timeout_end");
  if (r.rank == 0) EXPECT_TRUE(at::equal(late, at::ones({3})));  // landed in the parked buffer
}

void check_close_and_abort(Communicator& c, const Rank& r) {
  auto closed = c.fork(std::nullopt);
  at::Tensor t = at::ones({2});
  EXPECT_TRUE(closed->all_reduce(t, ReduceOp::kSum)->wait_for(10.0));
  EXPECT_TRUE(at::equal(t, at::full({2}, static_cast<double>(r.size))));
  closed->close(std::nullopt);
  expect_throw_with<CommError>([&] { closed->all_reduce(t, ReduceOp::kSum); },
                               {"rank " + std::to_string(r.rank), "all_reduce(sum)", "the communicator was closed"});
  auto aborted = c.fork(std::nullopt);
  aborted->abort();
  expect_throw_with<CommError>([&] { aborted->fork(std::nullopt); }, {"fork", "the communicator was aborted"});
  at::Tensor u = at::ones({2});
  c.all_reduce(u, ReduceOp::kSum)->wait(std::nullopt);  // the parent is unaffected
  EXPECT_TRUE(at::equal(u, at::full({2}, static_cast<double>(r.size))));
}

void world(const Rank& r) {
  auto c = r.communicator(30.0);
  EXPECT_EQ(c->rank(), r.rank);
  EXPECT_EQ(c->size(), r.size);
  EXPECT_EQ(c->backend(), "c10d:gloo");
  check_collectives(*c, r.rank, r.size);
  check_out_of_order(*c, r.rank, r.size);
  check_p2p(*c, r.rank, r.size);
  check_bad_input(*c, r.rank, r.size);
  check_recv_timeout(*c, r);
  check_close_and_abort(*c, r);
  r.barrier("end");
}

TEST(C10dCommunicator, TwoRanks) { run_ranks(2, world); }
TEST(C10dCommunicator, FourRanks) { run_ranks(4, world); }

TEST(C10dCommunicator, BadConstruction) {
  expect_throw_with<c10::ValueError>([] { C10dCommunicator(nullptr, at::Device(at::kCPU), 1.0); },
                                     {"the process group is None"});
  run_ranks(1, [](const Rank& r) {
    expect_throw_with<c10::ValueError>([&] { r.communicator(0.0); }, {"timeout must be positive"});
  });
}

// Rank 2 of 3 stops answering (alive, its group up, but it never sends nor joins): a recv
// from it times out naming it as the peer; then the others' all_reduce times out after the
// communicator's timeout, naming this rank and the operation (the communicator gives gloo
// the same limit for the collective; gloo then closes the group's connections, so the
// collective comes last).
TEST(C10dCommunicator, ARankThatStopsAnsweringTimesOut) {
  constexpr double kTimeout = 0.5;
  run_ranks(
      3,
      [&](const Rank& r) {
        auto c = r.communicator(kTimeout);
        auto side = c->fork(std::nullopt);  // forks are collective (a tag each): every rank forks
        if (r.rank < 2) {
          at::Tensor buf = at::empty({2});
          expect_throw_with<CommTimeout>([&] { side->recv(buf, 2)->wait(std::nullopt); },
                                         {"rank " + std::to_string(r.rank) + " of 3: recv of float32[2] from rank 2",
                                          "timed out after 0.5 s"});
          const auto start = testing::Clock::now();
          at::Tensor t = at::ones({4});
          expect_throw_with<CommTimeout>([&] { c->all_reduce(t, ReduceOp::kSum)->wait(std::nullopt); },
                                         {"rank " + std::to_string(r.rank) + " of 3: all_reduce(sum) of float32[4]",
                                          "timed out"});
          const double waited = seconds_since(start);
          EXPECT_GE(waited, kTimeout * 0.9);
          EXPECT_LT(waited, kTimeout + 5.0);
        }
        r.barrier("silent");  // rank 2 keeps its group up until the others gave up
      });
}

}  // namespace
}  // namespace tandem::comm
