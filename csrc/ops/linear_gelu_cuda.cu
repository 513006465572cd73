// CUDA side of the fused linear+GeLU: the cuBLASLt forward with a GeLU epilogue, and the
// elementwise kernels of the general path and of backward (math from gelu_math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <tuple>

#include "ops/linear_gelu.h"

namespace tandem::ops {

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t max_blocks = 8LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks)));
}

template <typename scalar_t>
__global__ void gelu_forward_kernel(const scalar_t* __restrict__ pre, scalar_t* __restrict__ out, int64_t n,
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

#define TANDEM_CUBLASLT_CHECK(expr)                                                         \
  do {                                                                                      \
    const cublasStatus_t _s = (expr);                                                       \
    TORCH_CHECK(_s == CUBLAS_STATUS_SUCCESS, "tandem: ", #expr, " failed with cublasStatus ", \
                static_cast<int>(_s));                                                      \
  } while (0)

// Owns the cuBLASLt descriptors of one matmul.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "tandem: no cuBLASLt type for ", t);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr size_t kWorkspaceBytes = 32 << 20;  // what cuBLASLt asks for on Hopper

// The algorithm the heuristic picks depends only on the problem (device, sizes, dtype,
// epilogue; operands are always 16-byte aligned here): ask once per problem.
using AlgoKey = std::tuple<int, int64_t, int64_t, int64_t, int, int>;
struct AlgoCache {
  std::mutex mu;
  std::map<AlgoKey, std::optional<cublasLtMatmulAlgo_t>> algos;  // nullopt: cuBLASLt has none
};
AlgoCache& algo_cache() {
  static AlgoCache cache;
  return cache;
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

bool linear_gelu_cublaslt(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                          Tensor& out, Tensor* pre) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  // cuBLASLt wants packed 16-byte aligned operands; the aux (pre-activation) leading
  // dimension must be a multiple of 8. Anything else takes the general path.
  const bool fits = M > 0 && K > 0 && N > 0 && N % 8 == 0 && K % 8 == 0 && x.is_contiguous() &&
                    weight.is_contiguous() && aligned16(x.const_data_ptr()) &&
                    aligned16(weight.const_data_ptr()) && aligned16(out.const_data_ptr()) &&
                    (!pre || aligned16(pre->const_data_ptr())) &&
                    (!bias || (bias->is_contiguous() && aligned16(bias->const_data_ptr())));
  if (!fits) return false;

  // Column-major view of the row-major problem out[M, N] = x[M, K] @ weight[N, K]^T:
  //   D (N x M, ld N) = op(A) (N x K) * B (K x M), A = weight as col-major K x N (ld K), op = T,
  //   B = x as col-major K x M (ld K). The bias is a vector over D's rows (N).
  const cudaDataType_t dt = cuda_type(x.scalar_type());
  LtDescriptors desc;
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));

  cublasLtEpilogue_t epilogue;
  if (bias) epilogue = pre ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_BIAS;
  else epilogue = pre ? CUBLASLT_EPILOGUE_GELU_AUX : CUBLASLT_EPILOGUE_GELU;
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (bias) {
    const void* bias_ptr = bias->const_data_ptr();
    TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)));
    TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt, sizeof(dt)));
  }
  if (pre) {
    void* aux_ptr = pre->data_ptr();
    const int64_t aux_ld = N;  // pre is [M, N] row-major = N x M column-major
    TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux_ptr, sizeof(aux_ptr)));
    TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
  }
  TANDEM_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&desc.a, dt, K, N, K));
  TANDEM_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&desc.b, dt, K, M, K));
  TANDEM_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&desc.d, dt, N, M, N));

  const size_t ws_bytes = kWorkspaceBytes;
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&desc.pref));
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const AlgoKey key{x.get_device(), M, N, K, static_cast<int>(x.scalar_type()), static_cast<int>(epilogue)};
  std::optional<cublasLtMatmulAlgo_t> algo;
  {
    AlgoCache& cache = algo_cache();
    std::lock_guard<std::mutex> lock(cache.mu);
    auto it = cache.algos.find(key);
    if (it == cache.algos.end()) {
      cublasLtMatmulHeuristicResult_t heuristic = {};
      int found = 0;
      const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d,
                                                               desc.pref, 1, &heuristic, &found);
      if (hs == CUBLAS_STATUS_SUCCESS && found > 0) algo = heuristic.algo;
      it = cache.algos.emplace(key, algo).first;
    }
    algo = it->second;
  }
  if (!algo) return false;  // cuBLASLt has no kernel for this problem: general path

  // from the caching allocator, stream-ordered: reused, not cudaMalloc'ed, after the first call
  auto workspace = at::empty({static_cast<int64_t>(kWorkspaceBytes)}, x.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  TANDEM_CUBLASLT_CHECK(cublasLtMatmul(handle, desc.op, &alpha, weight.const_data_ptr(), desc.a, x.const_data_ptr(),
                                       desc.b, &beta, out.data_ptr(), desc.d, out.data_ptr(), desc.d,
                                       &*algo, workspace.data_ptr(), ws_bytes,
                                       at::cuda::getCurrentCUDAStream()));
  return true;
}

}  // namespace tandem::ops
