#pragma once
// Which problems the fused ops send to cuBLASLt's GeLU epilogues, what an answer of its
// heuristic means, and which path ran (counted, so the CUDA tests can assert that the
// epilogue really ran: the general path is also what they compare against). Plain C++,
// compiled in every build: the CPU tests check these decisions.
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <vector>

#include "ops/gelu_math.h"

namespace tandem::ops {

// fp16 and bf16 with approximate="tanh". cuBLASLt's epilogues have tanh-GeLU only, and
// their tanh is approximate: PyTorch's own test of the GELU_AUX epilogue needs a 1e-4
// tolerance in fp32, and apex and flash-attention send only half types through it. So fp32
// takes the general path (as apex does): torch's GEMM, then our GeLU, as exact as F.gelu,
// and torch's own TF32 setting (either API) decides the GEMM's precision. fp64: no epilogue.
bool cublaslt_epilogue_eligible(at::ScalarType dtype, Gelu kind);

// What cublasLtMatmulAlgoGetHeuristic's answer means (cuBLASLt 13.1 header):
// CUBLAS_STATUS_SUCCESS with results: use them; CUBLAS_STATUS_NOT_SUPPORTED, or success with
// no result: cuBLASLt has no kernel for the problem (the general path, cached); any other
// status (INVALID_VALUE from a descriptor mistake, ...): a bug to raise, never cached.
enum class HeuristicOutcome { kUse, kNoKernel, kError };
HeuristicOutcome heuristic_outcome(bool status_success, bool status_not_supported, int results);

// Runs candidate i = 0, 1, ... with run(i) (true: it ran) until one runs; returns its index,
// or -1 when none did. `failed` gets the indices that did not run before it.
template <class Run>
int run_first_working(size_t n, Run&& run, std::vector<size_t>* failed) {
  for (size_t i = 0; i < n; ++i) {
    if (run(i)) return static_cast<int>(i);
    if (failed) failed->push_back(i);
  }
  return -1;
}

// Which path the fused ops took, counted per process.
enum class LtPath { kForwardEpilogue = 0, kForwardGeneral, kDgeluEpilogue, kDgeluGeneral };
void count_path(LtPath path);
std::array<int64_t, 4> path_counts();
void reset_path_counts();

}  // namespace tandem::ops
