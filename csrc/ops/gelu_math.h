// GeLU and its derivative, shared by the CPU and CUDA kernels so the CPU tests cover the
// formulas the GPU runs. Conventions match torch.nn.GELU:
//   "none": gelu(x) = x/2 * (1 + erf(x / sqrt(2)))
//   "tanh": gelu(x) = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
#pragma once

#include <cmath>
#include <string>

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#if defined(__CUDACC__)
#define TANDEM_HD __host__ __device__
#else
#define TANDEM_HD
#include <ATen/cpu/vec/vec.h>  // the CPU kernels run the same formulas on SIMD vectors
#endif

namespace tandem {

enum class Gelu { kNone, kTanh };

inline Gelu parse_gelu(c10::string_view approximate, const char* op) {
  if (approximate == "tanh") return Gelu::kTanh;
  if (approximate == "none") return Gelu::kNone;
  TORCH_CHECK_VALUE(false, op, ": approximate must be \"tanh\" or \"none\" (as torch.nn.GELU), got \"",
                    std::string(approximate.data(), approximate.size()), "\"");
}

namespace gelu {

TANDEM_HD inline float tanh_(float x) { return tanhf(x); }
TANDEM_HD inline double tanh_(double x) { return tanh(x); }
TANDEM_HD inline float erf_(float x) { return erff(x); }
TANDEM_HD inline double erf_(double x) { return erf(x); }
TANDEM_HD inline float exp_(float x) { return expf(x); }
TANDEM_HD inline double exp_(double x) { return exp(x); }
#if !defined(__CUDACC__)
template <typename S>
inline at::vec::Vectorized<S> tanh_(const at::vec::Vectorized<S>& x) { return x.tanh(); }
template <typename S>
inline at::vec::Vectorized<S> erf_(const at::vec::Vectorized<S>& x) { return x.erf(); }
template <typename S>
inline at::vec::Vectorized<S> exp_(const at::vec::Vectorized<S>& x) { return x.exp(); }
#endif

template <typename T>
TANDEM_HD inline T forward(T x, Gelu kind) {
  if (kind == Gelu::kTanh) {
    const T k0 = T(0.7978845608028654);  // sqrt(2/pi)
    const T k1 = T(0.044715);
    return T(0.5) * x * (T(1) + tanh_(k0 * (x + k1 * x * x * x)));
  }
  return T(0.5) * x * (T(1) + erf_(x * T(0.7071067811865476)));  // 1/sqrt(2)
}

// d gelu(x) / dx
template <typename T>
TANDEM_HD inline T derivative(T x, Gelu kind) {
  if (kind == Gelu::kTanh) {
    const T k0 = T(0.7978845608028654);
    const T k1 = T(0.044715);
    const T t = tanh_(k0 * (x + k1 * x * x * x));
    return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * k0 * (T(1) + T(3) * k1 * x * x);
  }
  const T cdf = T(0.5) * (T(1) + erf_(x * T(0.7071067811865476)));
  const T pdf = exp_(T(-0.5) * x * x) * T(0.3989422804014327);  // 1/sqrt(2 pi)
  return cdf + x * pdf;
}

}  // namespace gelu
}  // namespace tandem
