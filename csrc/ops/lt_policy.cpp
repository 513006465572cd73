// cuBLASLt path policy and path counters; see lt_policy.h.
#include "ops/lt_policy.h"

#include <atomic>

namespace tandem::ops {

namespace {
std::array<std::atomic<int64_t>, 4> g_counts{};
}

bool cublaslt_epilogue_eligible(at::ScalarType dtype, Gelu kind) {
  return kind == Gelu::kTanh && (dtype == at::kHalf || dtype == at::kBFloat16);
}

HeuristicOutcome heuristic_outcome(bool status_success, bool status_not_supported, int results) {
  if (status_success) return results > 0 ? HeuristicOutcome::kUse : HeuristicOutcome::kNoKernel;
  return status_not_supported ? HeuristicOutcome::kNoKernel : HeuristicOutcome::kError;
}

void count_path(LtPath path) { g_counts[static_cast<size_t>(path)].fetch_add(1, std::memory_order_relaxed); }

std::array<int64_t, 4> path_counts() {
  std::array<int64_t, 4> out{};
  for (size_t i = 0; i < out.size(); ++i) out[i] = g_counts[i].load(std::memory_order_relaxed);
  return out;
}

void reset_path_counts() {
  for (auto& c : g_counts) c.store(0, std::memory_order_relaxed);
}

}  // namespace tandem::ops
