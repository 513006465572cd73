// Column-parallel linear backward with the grad-input all-reduce overlapped.
#include "overlap/column_parallel.h"

#include "overlap/row_parallel.h"

namespace tandem::overlap {

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> column_parallel_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const comm::CommunicatorPtr& comm, bool weight_grad, bool bias_grad) {
  const char* op = "column_parallel_backward";
  TORCH_CHECK_VALUE(comm, op, ": the communicator is None");
  check_linear(op, input, weight, std::nullopt, *comm);
  TORCH_CHECK_VALUE(grad_output.dim() == input.dim() && grad_output.size(-1) == weight.size(0) &&
                        grad_output.sizes().slice(0, grad_output.dim() - 1) == input.sizes().slice(0, input.dim() - 1),
                    op, ": grad_output shape ", grad_output.sizes(), " must be input's leading dims + [",
                    weight.size(0), "] (input shape ", input.sizes(), ")");
  TORCH_CHECK_TYPE(grad_output.scalar_type() == weight.scalar_type(), op, ": grad_output dtype ",
                   grad_output.scalar_type(), " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == weight.device(), op, ": grad_output is on ", grad_output.device(),
                    " but weight is on ", weight.device());

  const at::Tensor g = grad_output.reshape({-1, weight.size(0)}).contiguous();  // (M, N/tp)
  // dgrad: (M, N/tp) @ (N/tp, K) -> (M, K), this rank's partial sum
  at::Tensor grad_input = at::mm(g, weight);
  // all-reduce (M, K) over tp on the comm stream ...
  comm::WorkPtr work = comm->all_reduce(grad_input, comm::ReduceOp::kSum);
  // ... while wgrad runs: (N/tp, M) @ (M, K) -> (N/tp, K)
  std::optional<at::Tensor> grad_weight, grad_bias;
  if (weight_grad) grad_weight = at::mm(g.t(), input.reshape({-1, input.size(-1)}));
  if (bias_grad) grad_bias = g.sum(0);  // (M, N/tp) -> (N/tp)
  work->wait(std::nullopt);
  return {grad_input.view(input.sizes()), grad_weight, grad_bias};
}

}  // namespace tandem::overlap
