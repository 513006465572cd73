// abort_all and share_failure_domain: see communicator.h.
#include "comm/communicator.h"

#ifdef TANDEM_WITH_CUDA
#include <set>

#include "comm/nccl_state.h"
#endif

namespace tandem::comm {

void abort_all(const std::vector<CommunicatorPtr>& comms, bool failure_domains) {
#ifdef TANDEM_WITH_CUDA
  std::vector<std::shared_ptr<NcclState>> states;
  std::set<NcclState*> seen;
  auto add = [&](const std::shared_ptr<NcclState>& s) {
    if (seen.insert(s.get()).second) states.push_back(s);
  };
  for (const auto& c : comms) {
    if (!c) continue;
    if (auto state = c->nccl_state()) {
      add(state);
      if (!failure_domains) continue;
      std::shared_ptr<FailureDomain> domain;
      {
        std::lock_guard<std::mutex> lock(state->mu);
        domain = state->domain;
      }
      for (const auto& member : domain->members()) add(member);
    } else {
      c->abort();
    }
  }
  abort_states(states, "the communicator was aborted", /*poison=*/false);
#else
  (void)failure_domains;
  for (const auto& c : comms)
    if (c) c->abort();
#endif
}

void share_failure_domain(const CommunicatorPtr& comm, const CommunicatorPtr& other) {
#ifdef TANDEM_WITH_CUDA
  auto a = comm ? comm->nccl_state() : nullptr;
  auto b = other ? other->nccl_state() : nullptr;
  if (a && b) FailureDomain::merge(a, b);
#else
  (void)comm;
  (void)other;
#endif
}

}  // namespace tandem::comm
