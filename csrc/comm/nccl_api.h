#pragma once
// The NCCL (and CUDA event) calls that decide a communicator's lifetime, behind a table of
// function pointers: the real library in production, a scripted fake in CPU tests
// (comm/fake_nccl.cpp). Everything that decides when to init, poll, revoke, abort, drain
// or destroy goes through this table, so the CPU tests drive the same code the GPU runs.
// The data-moving calls (ncclAllReduce, ncclSend, ...) stay direct: they need device memory.
#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime_api.h>
#include <nccl.h>

namespace tandem::comm {

struct NcclApi {
  ncclResult_t (*comm_init_rank_config)(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank,
                                        ncclConfig_t* config);
  ncclResult_t (*comm_split)(ncclComm_t comm, int color, int key, ncclComm_t* newcomm, ncclConfig_t* config);
  ncclResult_t (*comm_get_async_error)(ncclComm_t comm, ncclResult_t* async_error);
  ncclResult_t (*comm_finalize)(ncclComm_t comm);
  ncclResult_t (*comm_destroy)(ncclComm_t comm);
  ncclResult_t (*comm_abort)(ncclComm_t comm);
  // ncclCommRevoke (NCCL >= 2.28.7; checked in the 2.30.7 sources, src/init.cc): sets the
  // abort flags (in-flight kernels exit) and synchronises the comm's streams on a background
  // thread; non-blocking for a non-blocking communicator (returns ncclInProgress). Where the
  // loaded NCCL lacks it, an entry that answers ncclInvalidUsage.
  ncclResult_t (*comm_revoke)(ncclComm_t comm, int flags);
  ncclResult_t (*group_start)();
  ncclResult_t (*group_end)();
  const char* (*get_last_error)(ncclComm_t comm);
  // cudaEventQuery: cudaSuccess once the event fired, cudaErrorNotReady before.
  cudaError_t (*event_query)(cudaEvent_t event);
};

// The real NCCL and CUDA runtime.
const NcclApi& real_nccl();
// Whether the loaded libnccl.so.2 has ncclCommRevoke (looked up at run time).
bool nccl_has_revoke();

}  // namespace tandem::comm
#endif  // TANDEM_WITH_CUDA
