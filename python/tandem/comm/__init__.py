"""tandem.comm: the communication runtime (C++ core in tandem._C).

- :class:`Communicator`: all_reduce, all_gather, reduce_scatter, send, recv, batch_p2p over
  a torch.distributed group; NCCL on its own comm stream for CUDA, c10d (gloo) for CPU.
- :func:`row_parallel_linear` and :func:`column_parallel_backward`: GEMMs overlapped with
  the tensor-parallel all-reduce.
- :class:`StageLink`: pipeline stage-to-stage send/recv with static or dynamic shapes and
  timeouts that name the stage, the peer and the operation.
"""

from tandem.comm._communicator import (DEFAULT_TIMEOUT, CommError, CommTimeoutError, Communicator,
                                       Work)

__all__ = [
    "Communicator",
    "Work",
    "CommError",
    "CommTimeoutError",
    "DEFAULT_TIMEOUT",
]
