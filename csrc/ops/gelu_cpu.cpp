// CPU elementwise kernels of the fused linear+GeLU.
//
// The fast path is ATen's own GeLU kernels (SIMD, built per CPU capability inside libtorch,
// which an extension cannot match without its own ISA flags): one pass forward, one pass
// backward, exactly F.gelu's conventions. The formulas the CUDA kernels run (gelu_math.h)
// are also compiled here, behind the private op tandem::_gelu_formula, so CPU tests check
// them against torch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "ops/linear_gelu.h"

namespace tandem::ops {

namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel_for task
constexpr int64_t kBlock = 256;    // fp32 staging block for fp16/bf16

// out[i] = f(a[i]) or f(a[i], b[i]) for acc_t data, vectorised with a scalar tail.
template <typename acc_t, typename F>
void map_acc(const acc_t* a, const acc_t* b, acc_t* out, int64_t n, const F& f) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec va = Vec::loadu(a + i);
    const Vec vb = b ? Vec::loadu(b + i) : Vec(acc_t(0));
    f(va, vb).store(out + i);
  }
  for (; i < n; ++i) out[i] = f(a[i], b ? b[i] : acc_t(0));
}

// Apply f over n elements of scalar_t (a, optional b) into out, staging through acc_t.
template <typename scalar_t, typename F>
void map(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, const F& f) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      map_acc<acc_t>(a + i0, b ? b + i0 : nullptr, out + i0, i1 - i0, f);
    } else {
      acc_t fa[kBlock], fb[kBlock], fo[kBlock];
      for (int64_t s = i0; s < i1; s += kBlock) {
        const int64_t len = std::min(kBlock, i1 - s);
        for (int64_t j = 0; j < len; ++j) fa[j] = acc_t(a[s + j]);
        if (b) for (int64_t j = 0; j < len; ++j) fb[j] = acc_t(b[s + j]);
        map_acc<acc_t>(fa, b ? fb : nullptr, fo, len, f);
        for (int64_t j = 0; j < len; ++j) out[s + j] = scalar_t(fo[j]);
      }
    }
  });
}

}  // namespace

const char* approximate_name(Gelu kind) { return kind == Gelu::kTanh ? "tanh" : "none"; }

void gelu_forward_cpu(const Tensor& pre, Tensor& out, Gelu kind) {
  if (out.is_same(pre)) {
    at::gelu_(out, approximate_name(kind));
  } else {
    at::gelu_out(out, pre, approximate_name(kind));
  }
}

void gelu_backward_cpu(const Tensor& grad_out, const Tensor& pre, Tensor& grad_pre, Gelu kind) {
  at::gelu_backward_out(grad_pre, grad_out, pre, approximate_name(kind));  // grad_out * gelu'(pre)
}

void gelu_formula_forward_cpu(const Tensor& pre, Tensor& out, Gelu kind) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "gelu_forward_cpu", [&] {
    map<scalar_t>(pre.const_data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), pre.numel(),
                  [kind](const auto& x, const auto&) { return gelu::forward(x, kind); });
  });
}

void gelu_formula_backward_cpu(const Tensor& grad_out, const Tensor& pre, Tensor& grad_pre, Gelu kind) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "gelu_backward_cpu", [&] {
    // grad_pre = grad_out * gelu'(pre)
    map<scalar_t>(pre.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>(),
                  pre.numel(), [kind](const auto& x, const auto& g) { return g * gelu::derivative(x, kind); });
  });
}

Tensor gelu_formula(const Tensor& x, c10::string_view approximate, bool derivative) {
  const Gelu kind = parse_gelu(approximate, "_gelu_formula");
  const Tensor xc = x.contiguous();
  Tensor out = at::empty_like(xc);
#ifdef TANDEM_WITH_CUDA
  if (xc.is_cuda()) {
    if (derivative) {
      gelu_backward_cuda(at::ones_like(xc), xc, out, kind);
    } else {
      gelu_forward_cuda(xc, out, kind);
    }
    return out;
  }
#endif
  if (derivative) {
    gelu_formula_backward_cpu(at::ones_like(xc), xc, out, kind);
  } else {
    gelu_formula_forward_cpu(xc, out, kind);
  }
  return out;
}

}  // namespace tandem::ops
