// CUDA kernels of the fused linear+GeLU: the elementwise GeLU passes of the general path and
// of backward (math from gelu_math.h). The cuBLASLt epilogue path: linear_gelu_cublaslt.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "ops/linear_gelu.h"

namespace tandem::ops {

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t max_blocks = 8LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks)));
}

template <typename scalar_t>
__global__ void gelu_forward_kernel(const scalar_t* pre, scalar_t* out, int64_t n,  // may alias (in place)
                                    Gelu kind) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    out[i] = scalar_t(gelu::forward<acc_t>(acc_t(pre[i]), kind));
  }
}

template <typename scalar_t>
__global__ void gelu_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ pre,
                                     scalar_t* __restrict__ grad_pre, int64_t n, Gelu kind) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    grad_pre[i] = scalar_t(acc_t(grad_out[i]) * gelu::derivative<acc_t>(acc_t(pre[i]), kind));
  }
}

}  // namespace

void gelu_forward_cuda(const Tensor& pre, Tensor& out, Gelu kind) {
  const int64_t n = pre.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "gelu_forward_cuda", [&] {
    gelu_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        pre.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, kind);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void gelu_backward_cuda(const Tensor& grad_out, const Tensor& pre, Tensor& grad_pre, Gelu kind) {
  const int64_t n = pre.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "gelu_backward_cuda", [&] {
    gelu_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), pre.const_data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>(), n,
        kind);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace tandem::ops
