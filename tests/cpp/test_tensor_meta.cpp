// The wire header of StageLink (p2p/tensor_meta.h): round trips for every dtype and rank,
// clear errors for tensors that cannot travel, and corrupt headers (random bytes) that
// always raise a clear error and never crash.
#include <gtest/gtest.h>

#include <random>

#include "p2p/tensor_meta.h"
#include "world.h"

namespace tandem::p2p {
namespace {

using testing::expect_throw_with;

const std::vector<at::ScalarType> kSendable = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kLong,
                                               at::kInt,   at::kShort,  at::kChar, at::kByte,     at::kBool};

TEST(TensorMeta, RoundTripsEveryDtypeAndRank) {
  std::mt19937_64 rng(17);
  for (at::ScalarType dtype : kSendable) {
    for (int64_t ndim = 0; ndim <= kMaxDims; ++ndim) {
      std::vector<int64_t> shape;
      for (int64_t i = 0; i < ndim; ++i) shape.push_back(static_cast<int64_t>(rng() % 4));  // zeros included
      const at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
      const TensorMeta meta = meta_of(t, "test");
      EXPECT_EQ(meta.shape, shape);
      EXPECT_EQ(meta.dtype, dtype);
      const at::Tensor h = encode_header(meta);  // int64 [kHeaderLen]
      ASSERT_EQ(h.numel(), kHeaderLen);
      ASSERT_EQ(h.scalar_type(), at::kLong);
      EXPECT_EQ(decode_header(h, "test"), meta) << meta.str();
    }
  }
  EXPECT_EQ((TensorMeta{{4, 8}, at::kFloat}).str(), "float32[4, 8]");
  EXPECT_EQ((TensorMeta{{}, at::kBFloat16}).str(), "bfloat16[]");
}

TEST(TensorMeta, TensorsThatCannotTravelAreNamed) {
  expect_throw_with<c10::ValueError>([] { meta_of(at::zeros(std::vector<int64_t>(9, 1)), "stage 0: send_forward"); },
                                     {"stage 0: send_forward", "at most 8 dimensions", "got 9"});
  expect_throw_with<c10::TypeError>([] { meta_of(at::zeros({2}, at::kComplexFloat), "stage 1: send_backward"); },
                                    {"stage 1: send_backward", "dtype", "cannot be sent"});
  expect_throw_with<c10::ValueError>([] { meta_of(at::Tensor(), "x"); }, {"x: the tensor is undefined"});
}

TEST(TensorMeta, MalformedHeaderTensorsAreRejected) {
  for (const at::Tensor& h : {at::zeros({kHeaderLen}, at::kInt), at::zeros({kHeaderLen + 1}, at::kLong),
                              at::zeros({2, kHeaderLen}, at::kLong), at::zeros({0}, at::kLong)}) {
    expect_throw_with<c10::Error>([&] { decode_header(h, "stage 2: recv_forward from stage 1"); },
                                  {"stage 2: recv_forward from stage 1", "malformed header tensor"});
  }
}

// A header is valid exactly when ndim is in [0, kMaxDims], the dtype code in [0, 10) and the
// first ndim dimensions are >= 0; anything else raises naming the receive.
bool valid(const int64_t* p) {
  if (p[0] < 0 || p[0] > kMaxDims || p[1] < 0 || p[1] >= static_cast<int64_t>(kSendable.size())) return false;
  for (int64_t i = 0; i < p[0]; ++i)
    if (p[2 + i] < 0) return false;
  return true;
}

TEST(TensorMeta, CorruptHeadersAlwaysRaiseAClearErrorNeverCrash) {
  std::mt19937_64 rng(20261207);
  int accepted = 0, rejected = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    at::Tensor h = at::empty({kHeaderLen}, at::kLong);
    auto* p = h.data_ptr<int64_t>();
    const int kind = trial % 4;
    for (int64_t i = 0; i < kHeaderLen; ++i) p[i] = static_cast<int64_t>(rng());  // random bytes
    if (kind >= 1) p[0] = static_cast<int64_t>(rng() % 12) - 2;                  // near-valid ndim
    if (kind >= 2) p[1] = static_cast<int64_t>(rng() % 14) - 2;                  // near-valid dtype code
    if (kind == 3)
      for (int64_t i = 2; i < kHeaderLen; ++i) p[i] = static_cast<int64_t>(rng() % 8) - 1;  // small dims
    const bool expect_ok = valid(p);
    try {
      const TensorMeta meta = decode_header(h, "fuzz");
      ASSERT_TRUE(expect_ok) << "accepted a corrupt header";
      ASSERT_EQ(static_cast<int64_t>(meta.shape.size()), p[0]);
      EXPECT_TRUE(at::equal(encode_header(meta).narrow(0, 0, 2 + p[0]), h.narrow(0, 0, 2 + p[0])));
      ++accepted;
    } catch (const c10::Error& e) {
      ASSERT_FALSE(expect_ok) << "rejected a valid header: " << e.what();
      const std::string msg = e.what();
      ASSERT_NE(msg.find("fuzz: received a corrupt header"), std::string::npos) << msg;
      ++rejected;
    }
  }
  EXPECT_GT(accepted, 200);  // the generator reaches both outcomes
  EXPECT_GT(rejected, 200);
}

}  // namespace
}  // namespace tandem::p2p
