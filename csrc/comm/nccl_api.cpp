// The real NcclApi: see nccl_api.h.
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_api.h"

#include <dlfcn.h>

namespace tandem::comm {

namespace {

using RevokeFn = ncclResult_t (*)(ncclComm_t, int);

ncclResult_t revoke_unavailable(ncclComm_t, int) { return ncclInvalidUsage; }

// ncclCommRevoke came with NCCL 2.28.7 (checked in the NCCL sources: absent in 2.28.3,
// present in 2.28.7 and 2.30.7). The libnccl.so.2 loaded at run time is the one torch
// ships, which may be older than the headers this core was built with: a direct reference
// would make the core fail to load there. So it is looked up in the loaded library; without
// it, communicators are aborted without a revoke first (one at a time, as before 2.28).
RevokeFn find_revoke() {
  void* lib = dlopen("libnccl.so.2", RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return nullptr;
  auto fn = reinterpret_cast<RevokeFn>(dlsym(lib, "ncclCommRevoke"));
  dlclose(lib);  // NOLOAD took a reference to the library already loaded: give it back
  return fn;
}

}  // namespace

bool nccl_has_revoke() {
  static const bool has = find_revoke() != nullptr;
  return has;
}

const NcclApi& real_nccl() {
  static const NcclApi api{
      ncclCommInitRankConfig,
      ncclCommSplit,
      ncclCommGetAsyncError,
      ncclCommFinalize,
      ncclCommDestroy,
      ncclCommAbort,
      nccl_has_revoke() ? find_revoke() : revoke_unavailable,
      ncclGroupStart,
      ncclGroupEnd,
      ncclGetLastError,
      cudaEventQuery,
  };
  return api;
}

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
