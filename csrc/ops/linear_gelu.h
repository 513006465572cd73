// Fused linear + bias + GeLU: out = gelu(input @ weight^T + bias), torch.nn.functional
// conventions (weight is [N, K] = [out_features, in_features], input is [..., K]).
//
// Forward keeps the pre-activation (input @ weight^T + bias) for backward. Backward is
// split in two, as zero-bubble pipeline schedules need:
//   backward_input:  grad_pre = grad_out * gelu'(pre); grad_input = grad_pre @ weight;
//                    grad_bias = sum of grad_pre over tokens
//   backward_weight: grad_weight = grad_pre^T @ input
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include "ops/gelu_math.h"

namespace tandem::ops {

using at::Tensor;

// Shape, dtype and device checks shared by every backend; messages name the shapes.
void check_linear_gelu(const char* op, const Tensor& input, const Tensor& weight,
                       const std::optional<Tensor>& bias);

// [..., K] -> [M, K], contiguous (a copy only when needed).
Tensor as_tokens(const Tensor& t);

// Elementwise kernels, one implementation per device (gelu_cpu.cpp, linear_gelu_cuda.cu).
// out = gelu(pre), both contiguous with the same shape; out may alias pre.
void gelu_forward_cpu(const Tensor& pre, Tensor& out, Gelu kind);
// grad_pre = grad_out * gelu'(pre), all [M, N] contiguous, same dtype.
void gelu_backward_cpu(const Tensor& grad_out, const Tensor& pre, Tensor& grad_pre, Gelu kind);
#ifdef TANDEM_WITH_CUDA
void gelu_forward_cuda(const Tensor& pre, Tensor& out, Gelu kind);
void gelu_backward_cuda(const Tensor& grad_out, const Tensor& pre, Tensor& grad_pre, Gelu kind);
// One cuBLASLt matmul whose epilogue adds the bias and applies tanh-GeLU, storing the
// pre-activation in `pre` when it is given (GELU_AUX_BIAS); fp16 and bf16 only (lt_policy.h).
// Returns false, having written nothing, when cuBLASLt cannot take these operands
// (alignment, leading dimensions) or has no kernel for them (CUBLAS_STATUS_NOT_SUPPORTED):
// the caller then takes the general path. Any other cuBLASLt failure raises.
bool linear_gelu_cublaslt(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                          Tensor& out, Tensor* pre);
// grad_pre = (grad_output @ weight) * gelu'(pre) and grad_bias = sum of grad_pre over
// tokens, as ONE cuBLASLt matmul with the DGELU_BGRAD epilogue. Same contract as above.
bool linear_dgelu_bgrad_cublaslt(const Tensor& grad_output, const Tensor& weight, const Tensor& pre,
                                 Tensor& grad_pre, Tensor& grad_bias);
#endif

// The general path (any device): one ATen GEMM with the bias (addmm), then one GeLU pass. Also the reference
// the cuBLASLt path is tested against.
std::tuple<Tensor, Tensor> linear_bias_gelu_fwd_general(const Tensor& input, const Tensor& weight,
                                                        const std::optional<Tensor>& bias, Gelu kind,
                                                        bool keep_pre);

// The registered ops (device-generic entry points; device kernels are chosen inside).
Tensor linear_bias_gelu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                        c10::string_view approximate);
std::tuple<Tensor, Tensor> linear_bias_gelu_fwd(const Tensor& input, const Tensor& weight,
                                                const std::optional<Tensor>& bias,
                                                c10::string_view approximate);
std::tuple<Tensor, Tensor, Tensor> linear_bias_gelu_backward_input(const Tensor& grad_output,
                                                                   const Tensor& pre_activation,
                                                                   const Tensor& weight,
                                                                   c10::string_view approximate);
Tensor linear_bias_gelu_backward_weight(const Tensor& grad_pre_activation, const Tensor& input);
// Backward through a linear layer (weight [N2, N]) that follows a GeLU whose pre-activation is
// pre [..., N]: the next layer's input gradient, the GeLU backward and the bias gradient of the
// layer before, in one GEMM on CUDA (DGELU_BGRAD). Returns (grad_pre_activation, grad_bias).
std::tuple<Tensor, Tensor> linear_dgelu_bgrad(const Tensor& grad_output, const Tensor& weight,
                                              const Tensor& pre_activation, c10::string_view approximate);

// The shared GeLU formulas (gelu_math.h) as an op, for tests: gelu(x), or gelu'(x).
Tensor gelu_formula(const Tensor& x, c10::string_view approximate, bool derivative);

// Autograd kernel of linear_bias_gelu (linear_gelu_autograd.cpp).
Tensor linear_bias_gelu_autograd(const Tensor& input, const Tensor& weight,
                                 const std::optional<Tensor>& bias, c10::string_view approximate);

}  // namespace tandem::ops
