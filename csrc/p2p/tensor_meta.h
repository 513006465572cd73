#pragma once
// The shape and dtype of a tensor on the wire between pipeline stages: a fixed-size int64
// header [ndim, dtype code, d0, ..., d7] that precedes the tensor (dynamic mode, and the
// static mode's first-use handshake).
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace tandem::p2p {

constexpr int64_t kMaxDims = 8;
constexpr int64_t kHeaderLen = 2 + kMaxDims;

struct TensorMeta {
  std::vector<int64_t> shape;
  at::ScalarType dtype = at::kFloat;

  bool operator==(const TensorMeta& o) const { return shape == o.shape && dtype == o.dtype; }
  bool operator!=(const TensorMeta& o) const { return !(*this == o); }
  std::string str() const;  // "float32[4, 8]"
};

// Checks that t can travel (at most kMaxDims dims, a supported dtype); `what` names the call.
TensorMeta meta_of(const at::Tensor& t, const std::string& what);
// int64 [kHeaderLen] on the CPU.
at::Tensor encode_header(const TensorMeta& meta);
// From an int64 [kHeaderLen] CPU tensor; a corrupt header raises naming `what`.
TensorMeta decode_header(const at::Tensor& header, const std::string& what);

}  // namespace tandem::p2p
