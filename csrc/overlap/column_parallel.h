#pragma once
// Column-parallel linear backward: the input-gradient all-reduce overlapped with the
// weight-gradient GEMM (Megatron's async grad all-reduce).
#include <optional>
#include <tuple>

#include "comm/communicator.h"

namespace tandem::overlap {

// grad_output [..., N/tp], input [..., K] (replicated over tp), weight [N/tp, K] ->
//   grad_input  [..., K]    = all_reduce(grad_output @ weight) over tp,
//   grad_weight [N/tp, K]   = grad_output^T @ input   (if weight_grad; else undefined),
//   grad_bias   [N/tp]      = grad_output summed over tokens (if bias_grad; else undefined).
// The all-reduce of grad_input runs on the comm stream while the weight-grad GEMM runs.
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> column_parallel_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const comm::CommunicatorPtr& comm, bool weight_grad, bool bias_grad);

}  // namespace tandem::overlap
