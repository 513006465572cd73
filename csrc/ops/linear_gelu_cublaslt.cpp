// The cuBLASLt path of the fused linear+GeLU (CUDA builds): one matmul with the GELU_AUX_BIAS
// epilogue forward, one with DGELU_BGRAD backward. Host code only (the kernels are
// cuBLASLt's), so g++ compiles it, not nvcc.
#ifdef TANDEM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "ops/linear_gelu.h"
#include "ops/lt_policy.h"

namespace tandem::ops {

namespace {

#define TANDEM_CUBLASLT_CHECK(expr)                                                         \
  do {                                                                                      \
    const cublasStatus_t _s = (expr);                                                       \
    TORCH_CHECK(_s == CUBLAS_STATUS_SUCCESS, "tandem: ", #expr, " failed: ",                \
                cublasLtGetStatusName(_s), " (", cublasLtGetStatusString(_s), ")");          \
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

// The largest power of two <= 256 that divides the address (cuBLASLt's alignment classes).
uint32_t alignment_of(const void* p) {
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(p) % a) a /= 2;
  return a;
}

constexpr size_t kWorkspaceBytes = 32 << 20;  // what cuBLASLt asks for on Hopper
constexpr int kHeuristicResults = 8;          // candidates kept per problem, best first

// The algorithms the heuristic offers depend on the problem (device, sizes, dtype,
// epilogue) and on the operands' alignments (it may pick kernels that assume 256-byte
// alignment): ask once per problem and alignment, keep its candidates in order.
using AlgoKey = std::tuple<int, int64_t, int64_t, int64_t, int, int, uint32_t>;
struct CachedAlgos {
  std::vector<cublasLtMatmulAlgo_t> algos;  // empty: cuBLASLt has no kernel for the problem
};
struct AlgoCache {
  static constexpr size_t kMaxEntries = 4096;  // problems with ever new sizes (decoding) start over
  std::mutex mu;
  std::map<AlgoKey, CachedAlgos> entries;
};
AlgoCache& algo_cache() {
  static AlgoCache cache;
  return cache;
}

std::string status_text(cublasStatus_t s) {
  return std::string(cublasLtGetStatusName(s)) + " (" + cublasLtGetStatusString(s) + ")";
}

// One cuBLASLt matmul in column-major terms, D (m x n, ld m) = op(A) (m x k) * B (k x n), with
// an epilogue. Row-major callers pass their problem transposed (see the callers).
struct LtGemm {
  int64_t m, n, k;
  const void* a;
  cublasOperation_t trans_a;
  int64_t a_rows, a_cols;  // A as stored, column-major, packed (ld = a_rows)
  const void* b;           // B is k x n, packed (ld = k)
  void* d;
  at::ScalarType dtype;
  cublasLtEpilogue_t epilogue;
  const void* bias = nullptr;  // bias in, or the bias gradient out (BGRAD epilogues)
  void* aux = nullptr;         // GeLU pre-activation, m x n (ld m)
};

// "m=256 n=64 k=128 bf16 epilogue 3 (GELU_AUX_BIAS) trans_a=1": the problem in errors.
std::string describe(const LtGemm& g) {
  return "m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) + " " +
         c10::toString(g.dtype) + " epilogue " + std::to_string(static_cast<int>(g.epilogue)) +
         " trans_a=" + std::to_string(g.trans_a == CUBLAS_OP_T);
}

// Returns false, having launched nothing, when cuBLASLt has no kernel for the problem
// (CUBLAS_STATUS_NOT_SUPPORTED or no result: the caller takes the general path). Any other
// heuristic status raises; a candidate that fails to run is dropped and the next one tried;
// when every candidate fails it raises (never a silent fallback: see lt_policy.h).
bool lt_gemm(const LtGemm& g, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(cublaslt_epilogue_eligible(g.dtype, Gelu::kTanh), "tandem: lt_gemm got ", g.dtype);
  const cudaDataType_t dt = cuda_type(g.dtype);
  LtDescriptors desc;
  // half types accumulate in fp32 (fp32 operands never come here: lt_policy.h)
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_b = CUBLAS_OP_N;
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &g.trans_a, sizeof(g.trans_a)));
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue, sizeof(g.epilogue)));
  if (g.bias) {
    TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
    TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt, sizeof(dt)));
  }
  if (g.aux) {
    const int64_t aux_ld = g.m;
    TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux)));
    TANDEM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
  }
  TANDEM_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&desc.a, dt, g.a_rows, g.a_cols, g.a_rows));
  TANDEM_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&desc.b, dt, g.k, g.n, g.k));
  TANDEM_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&desc.d, dt, g.m, g.n, g.m));
  const size_t ws_bytes = kWorkspaceBytes;
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&desc.pref));
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)));
  // The heuristic assumes 256-byte aligned operands unless told otherwise.
  const uint32_t align_a = alignment_of(g.a), align_b = alignment_of(g.b), align_d = alignment_of(g.d);
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
  TANDEM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  // every pointer's alignment class, a nibble each (log2: 1..256 -> 0..8, none -> 15): A, B, D, bias, aux
  const void* pointers[5] = {g.a, g.b, g.d, g.bias, g.aux};
  uint32_t aligns = 0;
  for (int i = 0; i < 5; ++i) {
    uint32_t log2 = 15;  // absent
    if (pointers[i] != nullptr) {
      log2 = 0;
      for (uint32_t a = alignment_of(pointers[i]); a > 1; a /= 2) ++log2;
    }
    aligns = aligns * 16 + log2;
  }
  const AlgoKey key{options.device().index(), g.m, g.n, g.k, static_cast<int>(g.dtype),
                    static_cast<int>(g.epilogue) * 2 + (g.trans_a == CUBLAS_OP_T), aligns};
  std::vector<cublasLtMatmulAlgo_t> algos;
  {
    AlgoCache& cache = algo_cache();
    std::lock_guard<std::mutex> lock(cache.mu);
    auto it = cache.entries.find(key);
    if (it == cache.entries.end()) {
      cublasLtMatmulHeuristicResult_t results[kHeuristicResults] = {};
      int found = 0;
      const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d,
                                                               desc.pref, kHeuristicResults, results, &found);
      CachedAlgos entry;
      if (hs == CUBLAS_STATUS_SUCCESS) {
        for (int i = 0; i < found; ++i)
          if (results[i].state == CUBLAS_STATUS_SUCCESS) entry.algos.push_back(results[i].algo);
      }
      const HeuristicOutcome outcome = heuristic_outcome(hs == CUBLAS_STATUS_SUCCESS, hs == CUBLAS_STATUS_NOT_SUPPORTED,
                                                         static_cast<int>(entry.algos.size()));
      TORCH_CHECK(outcome != HeuristicOutcome::kError, "tandem: cublasLtMatmulAlgoGetHeuristic failed for ",
                  describe(g), ": ", status_text(hs), " (a descriptor or layout the fused op got wrong)");
      if (cache.entries.size() >= AlgoCache::kMaxEntries) cache.entries.clear();
      it = cache.entries.emplace(key, std::move(entry)).first;
    }
    algos = it->second.algos;
  }
  if (algos.empty()) return false;  // cuBLASLt has no kernel for this problem: general path

  // From the caching allocator, stream-ordered: reused, not cudaMalloc'ed, after the first
  // call. Inside a CUDA graph capture it comes from the graph's private pool (the allocator
  // is capture-aware), so the fused op may be captured; tests/test_linear_gelu_cuda.py
  // replays one against eager calls.
  auto workspace = at::empty({static_cast<int64_t>(kWorkspaceBytes)}, options.dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cublasStatus_t last = CUBLAS_STATUS_SUCCESS;
  std::vector<size_t> failed;
  const int ran = run_first_working(algos.size(), [&](size_t i) {
    last = cublasLtMatmul(handle, desc.op, &alpha, g.a, desc.a, g.b, desc.b, &beta, g.d, desc.d, g.d, desc.d,
                          &algos[i], workspace.data_ptr(), ws_bytes, stream);
    return last == CUBLAS_STATUS_SUCCESS;
  }, &failed);
  TORCH_CHECK(ran >= 0, "tandem: cublasLtMatmul failed with each of the ", algos.size(),
              " algorithms the heuristic offered for ", describe(g), "; the last: ", status_text(last));
  if (!failed.empty()) {  // an algorithm offered that cannot run: the next ones first from now on
    AlgoCache& cache = algo_cache();
    std::lock_guard<std::mutex> lock(cache.mu);
    auto it = cache.entries.find(key);
    if (it != cache.entries.end()) it->second.algos.assign(algos.begin() + ran, algos.end());
  }
  return true;
}

// cuBLASLt wants packed, 16-byte aligned operands; aux leading dimensions a multiple of 8.
bool lt_fits(std::initializer_list<const Tensor*> tensors, std::initializer_list<int64_t> dims) {
  for (const Tensor* t : tensors) {
    if (t && (!t->is_contiguous() || !aligned16(t->const_data_ptr()))) return false;
  }
  for (int64_t d : dims) {
    if (d <= 0 || d % 8) return false;
  }
  return true;
}

}  // namespace

bool linear_gelu_cublaslt(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                          Tensor& out, Tensor* pre) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  if (M == 0 || !lt_fits({&x, &weight, &out, pre, bias ? &*bias : nullptr}, {N, K})) return false;
  // Column-major view of the row-major out[M, N] = x[M, K] @ weight[N, K]^T:
  //   D (N x M) = op(A) (N x K) * B (K x M), A = weight stored as col-major K x N, op = T,
  //   B = x stored as col-major K x M. The bias is a vector over D's rows (N).
  LtGemm g{N, M, K, weight.const_data_ptr(), CUBLAS_OP_T, K, N, x.const_data_ptr(), out.data_ptr(),
           x.scalar_type(), CUBLASLT_EPILOGUE_GELU};
  if (bias) g.epilogue = pre ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_BIAS;
  else if (pre) g.epilogue = CUBLASLT_EPILOGUE_GELU_AUX;
  g.bias = bias ? bias->const_data_ptr() : nullptr;
  g.aux = pre ? pre->data_ptr() : nullptr;  // pre [M, N] row-major = N x M col-major, ld N
  return lt_gemm(g, x.options());
}

bool linear_dgelu_bgrad_cublaslt(const Tensor& grad_output, const Tensor& weight, const Tensor& pre,
                                 Tensor& grad_pre, Tensor& grad_bias) {
  const int64_t M = grad_output.size(0), N2 = grad_output.size(1), N = weight.size(1);
  if (M == 0 || !lt_fits({&grad_output, &weight, &pre, &grad_pre, &grad_bias}, {N, N2})) return false;
  // Column-major view of grad_pre[M, N] = (grad_output[M, N2] @ weight[N2, N]) * gelu'(pre[M, N]):
  //   D (N x M) = A (N x N2) * B (N2 x M), A = weight stored as col-major N x N2, op = N,
  //   B = grad_output stored as col-major N2 x M. DGELU_BGRAD multiplies by gelu'(aux) and
  //   sums D's rows into the bias gradient (N).
  LtGemm g{N, M, N2, weight.const_data_ptr(), CUBLAS_OP_N, N, N2, grad_output.const_data_ptr(),
           grad_pre.data_ptr(), grad_output.scalar_type(), CUBLASLT_EPILOGUE_DGELU_BGRAD};
  g.bias = grad_bias.data_ptr();
  g.aux = const_cast<void*>(pre.const_data_ptr());  // read-only for DGELU
  return lt_gemm(g, grad_output.options());
}

}  // namespace tandem::ops
#endif  // TANDEM_WITH_CUDA
