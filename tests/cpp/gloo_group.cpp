// gloo_group (world.h). torch's ProcessGroupGloo.hpp includes gloo's headers, which the torch
// wheel does not ship: they come from the system (Debian: libgloo-dev). Every gloo type in
// ProcessGroupGloo's layout is held by pointer, so that layout does not depend on which
// gloo's headers declare those types; the code that runs is torch's own.
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "world.h"

namespace tandem::testing {

c10::intrusive_ptr<c10d::ProcessGroup> gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                                  double gloo_timeout_s) {
  auto opts = c10d::ProcessGroupGloo::Options::create(
      std::chrono::milliseconds(static_cast<int64_t>(gloo_timeout_s * 1000)));
  opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, size);
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, backend);
  return pg;
}

}  // namespace tandem::testing
