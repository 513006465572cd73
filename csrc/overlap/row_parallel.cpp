// Row-parallel linear forward, chunked so that GEMMs and all-reduces overlap.
#include "overlap/row_parallel.h"

namespace tandem::overlap {

std::vector<int64_t> chunk_sizes(int64_t rows, int64_t chunks) {
  const int64_t n = std::min(chunks, rows);
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < n; ++i) sizes.push_back(rows / n + (i < rows % n ? 1 : 0));
  return sizes;
}

void check_linear(const char* op, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const comm::Communicator& comm) {
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == weight.size(1), op, ": input shape ", input.sizes(),
                    " does not end in in_features=", weight.size(1), " of weight shape ", weight.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), op, ": input dtype must be floating point, got ",
                   input.scalar_type());
  TORCH_CHECK_TYPE(input.scalar_type() == weight.scalar_type(), op, ": input dtype ", input.scalar_type(),
                   " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK_VALUE(input.device() == weight.device() && input.device() == comm.device(), op, ": input on ",
                    input.device(), ", weight on ", weight.device(), " and the communicator on ", comm.device(),
                    " must be the same device");
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias shape ", bias->sizes(),
                    " does not match out_features=", weight.size(0));
  TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                   " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK_VALUE(bias->device() == weight.device(), op, ": bias is on ", bias->device(), " but weight is on ",
                    weight.device());
}

at::Tensor row_parallel_linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const comm::CommunicatorPtr& comm,
                                       int64_t chunks) {
  TORCH_CHECK_VALUE(comm, "row_parallel_linear: the communicator is None");
  check_linear("row_parallel_linear", input, weight, bias, *comm);
  TORCH_CHECK_VALUE(chunks >= 1, "row_parallel_linear: chunks must be >= 1, got ", chunks);
  const int64_t n_out = weight.size(0);
  const at::Tensor x = input.reshape({-1, input.size(-1)}).contiguous();  // (M, K/tp)
  const at::Tensor w_t = weight.t();                                      // (K/tp, N)
  at::Tensor out = at::empty({x.size(0), n_out}, x.options());            // (M, N)

  std::vector<comm::WorkPtr> works;
  int64_t row = 0;
  for (int64_t rows : chunk_sizes(x.size(0), chunks)) {
    at::Tensor block = out.narrow(0, row, rows);  // contiguous row block of out
    // (m_i, K/tp) @ (K/tp, N) -> (m_i, N), partial sums of this rank's K/tp slice
    at::mm_out(block, x.narrow(0, row, rows), w_t);
    // all-reduce (m_i, N) over tp on the comm stream, while the next block's GEMM runs
    works.push_back(comm->all_reduce(block, comm::ReduceOp::kSum));
    row += rows;
  }
  for (auto& w : works) w->wait(std::nullopt);  // CUDA: the current stream waits, not the host
  if (bias.has_value()) out.add_(*bias);        // (M, N) + (N), once, after the sum
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = n_out;
  return out.view(shape);
}

}  // namespace tandem::overlap
