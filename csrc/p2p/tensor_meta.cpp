// Wire header of a tensor between pipeline stages; see tensor_meta.h.
#include "p2p/tensor_meta.h"

#include <array>

#include "comm/communicator.h"

namespace tandem::p2p {

namespace {

// dtype codes on the wire (stable, independent of c10::ScalarType's numbering)
constexpr std::array<at::ScalarType, 10> kDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kLong,
                                                    at::kInt,   at::kShort,  at::kChar, at::kByte,     at::kBool};

int64_t dtype_code(at::ScalarType t) {
  for (size_t i = 0; i < kDtypes.size(); ++i)
    if (kDtypes[i] == t) return static_cast<int64_t>(i);
  return -1;
}

}  // namespace

std::string TensorMeta::str() const { return comm::tensor_signature(dtype, shape); }

TensorMeta meta_of(const at::Tensor& t, const std::string& what) {
  TORCH_CHECK_VALUE(t.defined(), what, ": the tensor is undefined");
  TORCH_CHECK_VALUE(t.dim() <= kMaxDims, what, ": tensors of at most ", kMaxDims, " dimensions can be sent, got ",
                    t.dim(), " (shape ", t.sizes(), ")");
  TORCH_CHECK_TYPE(dtype_code(t.scalar_type()) >= 0, what, ": dtype ", t.scalar_type(), " cannot be sent");
  return TensorMeta{t.sizes().vec(), t.scalar_type()};
}

at::Tensor encode_header(const TensorMeta& meta) {
  at::Tensor h = at::zeros({kHeaderLen}, at::kLong);
  auto* p = h.data_ptr<int64_t>();
  p[0] = static_cast<int64_t>(meta.shape.size());
  p[1] = dtype_code(meta.dtype);
  for (size_t i = 0; i < meta.shape.size(); ++i) p[2 + i] = meta.shape[i];
  return h;
}

TensorMeta decode_header(const at::Tensor& header, const std::string& what) {
  TORCH_CHECK(header.is_cpu() && header.scalar_type() == at::kLong && header.numel() == kHeaderLen, what,
              ": malformed header tensor");
  const auto* p = header.data_ptr<int64_t>();
  const int64_t ndim = p[0], code = p[1];
  TORCH_CHECK(ndim >= 0 && ndim <= kMaxDims && code >= 0 && code < static_cast<int64_t>(kDtypes.size()), what,
              ": received a corrupt header (ndim ", ndim, ", dtype code ", code,
              "); the peer's sends and this stage's recvs are out of step");
  TensorMeta meta;
  meta.dtype = kDtypes[code];
  for (int64_t i = 0; i < ndim; ++i) {
    TORCH_CHECK(p[2 + i] >= 0, what, ": received a corrupt header (dimension ", i, " is ", p[2 + i], ")");
    meta.shape.push_back(p[2 + i]);
  }
  return meta;
}

}  // namespace tandem::p2p
