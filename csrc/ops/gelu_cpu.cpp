// CPU elementwise kernels of the fused linear+GeLU: one pass each, math in fp32 (fp64 for
// double) through the formulas shared with CUDA (gelu_math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "ops/linear_gelu.h"

namespace tandem::ops {

namespace {
constexpr int64_t kGrain = 32768;  // elements per parallel_for task
}

void gelu_forward_cpu(const Tensor& pre, Tensor& out, Gelu kind) {
  const int64_t n = pre.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "gelu_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = pre.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = scalar_t(gelu::forward<acc_t>(acc_t(p[i]), kind));
    });
  });
}

void gelu_backward_cpu(const Tensor& grad_out, const Tensor& pre, Tensor& grad_pre, Gelu kind) {
  const int64_t n = pre.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "gelu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* p = pre.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_pre.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        gp[i] = scalar_t(acc_t(g[i]) * gelu::derivative<acc_t>(acc_t(p[i]), kind));
      }
    });
  });
}

}  // namespace tandem::ops
