// Device-generic entry points of the fused linear+bias+GeLU ops: argument checks, the
// general path (ATen GEMM + one fused elementwise pass) and the split backward. The CUDA
// forward first tries one cuBLASLt matmul with a GeLU epilogue (linear_gelu_cuda.cu).
#include "ops/linear_gelu.h"
#include "ops/lt_policy.h"

#include <c10/core/DeviceGuard.h>

namespace tandem::ops {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

void gelu_forward(const Tensor& pre, Tensor& out, Gelu kind) {
#ifdef TANDEM_WITH_CUDA
  if (pre.is_cuda()) return gelu_forward_cuda(pre, out, kind);
#endif
  TORCH_CHECK(pre.is_cpu(), "tandem: no kernel for device ", pre.device(), " (built without CUDA?)");
  gelu_forward_cpu(pre, out, kind);
}

void gelu_backward(const Tensor& grad_out, const Tensor& pre, Tensor& grad_pre, Gelu kind) {
#ifdef TANDEM_WITH_CUDA
  if (pre.is_cuda()) return gelu_backward_cuda(grad_out, pre, grad_pre, kind);
#endif
  TORCH_CHECK(pre.is_cpu(), "tandem: no kernel for device ", pre.device(), " (built without CUDA?)");
  gelu_backward_cpu(grad_out, pre, grad_pre, kind);
}

}  // namespace

void check_linear_gelu(const char* op, const Tensor& input, const Tensor& weight,
                       const std::optional<Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": input must have at least 1 dimension, got a scalar");
  TORCH_CHECK_VALUE(input.size(-1) == weight.size(1), op, ": input shape ", input.sizes(), " has ",
                    input.size(-1), " features in its last dimension but weight shape ", weight.sizes(),
                    " expects in_features=", weight.size(1));
  TORCH_CHECK_TYPE(supported_dtype(input.scalar_type()), op,
                   ": dtype must be float32, float64, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK_TYPE(input.scalar_type() == weight.scalar_type(), op, ": input dtype ", input.scalar_type(),
                   " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK_VALUE(input.device() == weight.device(), op, ": input is on ", input.device(),
                    " but weight is on ", weight.device());
  if (!bias.has_value()) return;
  const Tensor& b = *bias;
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == weight.size(0), op, ": bias shape ", b.sizes(),
                    " does not match out_features=", weight.size(0), " of weight shape ", weight.sizes());
  TORCH_CHECK_TYPE(b.scalar_type() == weight.scalar_type(), op, ": bias dtype ", b.scalar_type(),
                   " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK_VALUE(b.device() == weight.device(), op, ": bias is on ", b.device(), " but weight is on ",
                    weight.device());
}

Tensor as_tokens(const Tensor& t) { return t.reshape({-1, t.size(-1)}).contiguous(); }

std::tuple<Tensor, Tensor> linear_bias_gelu_fwd_general(const Tensor& input, const Tensor& weight,
                                                        const std::optional<Tensor>& bias, Gelu kind,
                                                        bool keep_pre) {
  const Tensor x = as_tokens(input);
  // (M, K) @ (K, N) + (N) -> (M, N), the bias added in the GEMM's epilogue as F.linear does
  Tensor pre = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  Tensor out = keep_pre ? at::empty_like(pre) : pre;
  gelu_forward(pre, out, kind);  // (M, N) -> (M, N), one pass
  const auto shape = with_last(input.sizes(), weight.size(0));
  return {out.view(shape), keep_pre ? pre.view(shape) : Tensor()};
}

namespace {

// The fused forward: cuBLASLt epilogue where it applies, else the general path.
std::tuple<Tensor, Tensor> forward(const Tensor& input, const Tensor& weight,
                                   const std::optional<Tensor>& bias, c10::string_view approximate,
                                   bool keep_pre, const char* op) {
  check_linear_gelu(op, input, weight, bias);
  const Gelu kind = parse_gelu(approximate, op);
  const at::OptionalDeviceGuard guard(input.device());
#ifdef TANDEM_WITH_CUDA
  // cuBLASLt's epilogue: fp16/bf16 with tanh-GeLU (lt_policy.h); the rest takes the general path.
  if (input.is_cuda() && cublaslt_epilogue_eligible(input.scalar_type(), kind)) {
    const Tensor x = as_tokens(input);
    const Tensor w = weight.contiguous();
    std::optional<Tensor> b;
    if (bias.has_value()) b = bias->contiguous();
    Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
    Tensor pre = keep_pre ? at::empty_like(out) : Tensor();
    if (linear_gelu_cublaslt(x, w, b, out, keep_pre ? &pre : nullptr)) {
      count_path(LtPath::kForwardEpilogue);
      const auto shape = with_last(input.sizes(), weight.size(0));
      return {out.view(shape), keep_pre ? pre.view(shape) : Tensor()};
    }
  }
#endif
  count_path(LtPath::kForwardGeneral);
  return linear_bias_gelu_fwd_general(input, weight, bias, kind, keep_pre);
}

}  // namespace

Tensor linear_bias_gelu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                        c10::string_view approximate) {
  return std::get<0>(forward(input, weight, bias, approximate, false, "linear_bias_gelu"));
}

std::tuple<Tensor, Tensor> linear_bias_gelu_fwd(const Tensor& input, const Tensor& weight,
                                                const std::optional<Tensor>& bias,
                                                c10::string_view approximate) {
  return forward(input, weight, bias, approximate, true, "linear_bias_gelu_fwd");
}

std::tuple<Tensor, Tensor, Tensor> linear_bias_gelu_backward_input(const Tensor& grad_output,
                                                                   const Tensor& pre_activation,
                                                                   const Tensor& weight,
                                                                   c10::string_view approximate) {
  const char* op = "linear_bias_gelu_backward_input";
  const Gelu kind = parse_gelu(approximate, op);
  TORCH_CHECK_VALUE(grad_output.sizes() == pre_activation.sizes(), op, ": grad_output shape ",
                    grad_output.sizes(), " differs from pre_activation shape ", pre_activation.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && pre_activation.dim() >= 1 &&
                        pre_activation.size(-1) == weight.size(0),
                    op, ": pre_activation shape ", pre_activation.sizes(),
                    " does not match weight shape ", weight.sizes(), " [out_features, in_features]");
  TORCH_CHECK_TYPE(grad_output.scalar_type() == pre_activation.scalar_type() &&
                       weight.scalar_type() == pre_activation.scalar_type(),
                   op, ": dtypes differ: grad_output ", grad_output.scalar_type(), ", pre_activation ",
                   pre_activation.scalar_type(), ", weight ", weight.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == pre_activation.device() &&
                        weight.device() == pre_activation.device(),
                    op, ": devices differ: grad_output ", grad_output.device(), ", pre_activation ",
                    pre_activation.device(), ", weight ", weight.device());
  const at::OptionalDeviceGuard guard(weight.device());
  const Tensor g = as_tokens(grad_output);
  const Tensor p = as_tokens(pre_activation);
  Tensor grad_pre = at::empty_like(p);
  gelu_backward(g, p, grad_pre, kind);           // (M, N): grad_out * gelu'(pre)
  Tensor grad_bias = grad_pre.sum(0);            // (M, N) -> (N)
  Tensor grad_input = at::mm(grad_pre, weight);  // (M, N) @ (N, K) -> (M, K)
  return {grad_input.view(with_last(pre_activation.sizes(), weight.size(1))),
          grad_pre.view(pre_activation.sizes()), grad_bias};
}

Tensor linear_bias_gelu_backward_weight(const Tensor& grad_pre_activation, const Tensor& input) {
  const char* op = "linear_bias_gelu_backward_weight";
  TORCH_CHECK_VALUE(grad_pre_activation.dim() >= 1 && input.dim() >= 1 &&
                        grad_pre_activation.numel() / std::max<int64_t>(grad_pre_activation.size(-1), 1) ==
                            input.numel() / std::max<int64_t>(input.size(-1), 1),
                    op, ": grad_pre_activation shape ", grad_pre_activation.sizes(), " and input shape ",
                    input.sizes(), " must have the same number of tokens");
  TORCH_CHECK_TYPE(grad_pre_activation.scalar_type() == input.scalar_type(), op, ": dtypes differ: ",
                   grad_pre_activation.scalar_type(), " vs ", input.scalar_type());
  TORCH_CHECK_VALUE(grad_pre_activation.device() == input.device(), op, ": devices differ: ",
                    grad_pre_activation.device(), " vs ", input.device());
  const at::OptionalDeviceGuard guard(input.device());
  const Tensor gp = grad_pre_activation.reshape({-1, grad_pre_activation.size(-1)});
  const Tensor x = input.reshape({-1, input.size(-1)});
  return at::mm(gp.t(), x);  // (N, M) @ (M, K) -> (N, K)
}

std::tuple<Tensor, Tensor> linear_dgelu_bgrad(const Tensor& grad_output, const Tensor& weight,
                                              const Tensor& pre_activation, c10::string_view approximate) {
  const char* op = "linear_dgelu_bgrad";
  const Gelu kind = parse_gelu(approximate, op);
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(grad_output.dim() >= 1 && grad_output.size(-1) == weight.size(0), op, ": grad_output shape ",
                    grad_output.sizes(), " does not match weight shape ", weight.sizes(), " (out_features ",
                    weight.size(0), ")");
  TORCH_CHECK_VALUE(pre_activation.dim() == grad_output.dim() && pre_activation.size(-1) == weight.size(1) &&
                        pre_activation.sizes().slice(0, pre_activation.dim() - 1) ==
                            grad_output.sizes().slice(0, grad_output.dim() - 1),
                    op, ": pre_activation shape ", pre_activation.sizes(), " must be grad_output's leading dims ",
                    "with in_features=", weight.size(1), " (grad_output ", grad_output.sizes(), ")");
  TORCH_CHECK_TYPE(grad_output.scalar_type() == weight.scalar_type() &&
                       pre_activation.scalar_type() == weight.scalar_type(),
                   op, ": dtypes differ: grad_output ", grad_output.scalar_type(), ", weight ",
                   weight.scalar_type(), ", pre_activation ", pre_activation.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == weight.device() && pre_activation.device() == weight.device(), op,
                    ": devices differ: grad_output ", grad_output.device(), ", weight ", weight.device(),
                    ", pre_activation ", pre_activation.device());
  const at::OptionalDeviceGuard guard(weight.device());
  const Tensor g = as_tokens(grad_output);
  const Tensor p = as_tokens(pre_activation);
#ifdef TANDEM_WITH_CUDA
  if (g.is_cuda() && cublaslt_epilogue_eligible(g.scalar_type(), kind)) {
    Tensor grad_pre = at::empty_like(p);
    Tensor grad_bias = at::empty({weight.size(1)}, p.options());
    if (linear_dgelu_bgrad_cublaslt(g, weight.contiguous(), p, grad_pre, grad_bias)) {
      count_path(LtPath::kDgeluEpilogue);
      return {grad_pre.view(pre_activation.sizes()), grad_bias};
    }
  }
#endif
  count_path(LtPath::kDgeluGeneral);
  const Tensor up = at::mm(g, weight);  // (M, N2) @ (N2, N) -> (M, N): the gradient of gelu(pre)
  Tensor grad_pre = at::empty_like(p);
  gelu_backward(up, p, grad_pre, kind);  // (M, N) * gelu'(pre)
  Tensor grad_bias = grad_pre.sum(0);    // (M, N) -> (N)
  return {grad_pre.view(pre_activation.sizes()), grad_bias};
}

}  // namespace tandem::ops
