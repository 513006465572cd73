"""tandem.comm: the communication runtime (C++ core in tandem._C).

- :class:`Communicator`: all_reduce, all_gather, reduce_scatter, send, recv, batch_p2p over
  a torch.distributed group; NCCL on its own comm stream for CUDA, c10d (gloo) for CPU.
- :func:`row_parallel_linear`, :func:`column_parallel_backward` (and
  :func:`column_parallel_linear`): GEMMs overlapped with the tensor-parallel all-reduce.
- :class:`StageLink`: pipeline stage-to-stage send/recv with static or dynamic shapes and
  timeouts that name the stage, the peer and the operation.
"""

from tandem.comm._communicator import (DEFAULT_TIMEOUT, CommError, CommTimeoutError, Communicator,
                                       Work, abort_all)
from tandem.comm._overlap import column_parallel_backward, column_parallel_linear, row_parallel_linear
from tandem.comm._stage_link import RecvHandle, StageLink

__all__ = [
    "Communicator",
    "Work",
    "CommError",
    "CommTimeoutError",
    "DEFAULT_TIMEOUT",
    "abort_all",
    "StageLink",
    "RecvHandle",
    "row_parallel_linear",
    "column_parallel_backward",
    "column_parallel_linear",
]
