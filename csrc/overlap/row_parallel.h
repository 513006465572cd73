#pragma once
// Row-parallel linear forward with the GEMM of token chunk i overlapped with the tensor-
// parallel all-reduce of chunk i-1.
#include <optional>

#include "comm/communicator.h"

namespace tandem::overlap {

// input [..., K/tp] x weight [N, K/tp] -> [..., N], summed over the tp group, + bias [N].
// Tokens are cut into `chunks` row blocks (sizes differ by at most one); the GEMM of block
// i runs on the caller's stream while block i-1's all-reduce runs on the comm stream
// (CPU/gloo: on gloo's worker thread). Equals all_reduce(input @ weight.T) + bias.
at::Tensor row_parallel_linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const comm::CommunicatorPtr& comm,
                                       int64_t chunks);

// Row-block boundaries: `rows` cut into min(chunks, rows) blocks, sizes differing by <= 1.
std::vector<int64_t> chunk_sizes(int64_t rows, int64_t chunks);

// Checks shared by the overlap ops: weight 2-D [out, in], input [..., in], dtypes, devices.
void check_linear(const char* op, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const comm::Communicator& comm);

}  // namespace tandem::overlap
