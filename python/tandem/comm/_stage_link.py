"""StageLink: the send/recv runtime between adjacent pipeline stages (C++ in csrc/p2p)."""

from __future__ import annotations

import collections
import os
import warnings
from typing import Optional

from torch import Tensor

from tandem import _C
from tandem.comm._communicator import DEFAULT_TIMEOUT, Communicator, _live_nccl

__all__ = ["StageLink", "RecvHandle"]

RecvHandle = _C.RecvHandle
_links_per_group: collections.Counter = collections.Counter()


def _default_board(comm: Communicator):
    """(store, key) of the job's store, or (None, "") outside torch.distributed. The key is
    the same on every rank of the group: the group's ranks and how many links this process
    built on it before (construction is collective, in the same order)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None, ""
    from torch.distributed import distributed_c10d as c10d

    try:
        store = c10d._get_default_store()
        ranks = tuple(dist.get_process_group_ranks(comm.group or dist.group.WORLD))
    except (RuntimeError, ValueError, AttributeError):  # no store reachable: local checks only
        return None, ""
    n = _links_per_group[ranks]
    _links_per_group[ranks] += 1
    return store, "tandem/stagelink/" + "-".join(map(str, ranks)) + f"/{n}/error"


def _serialising_settings(environ) -> list[str]:
    """The settings in ``environ`` under which an early-posted receive can stall a pipeline
    until its timeout, each with why. A receive posted early keeps an NCCL kernel waiting on
    the GPU while other work runs; then:

    - ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (which some TP setups ask for) puts every stream in
      one hardware queue: the kernels queued after that receive wait behind it, and a peer
      whose send depends on them never sends;
    - ``CUDA_LAUNCH_BLOCKING=1`` makes every launch wait until the kernel ended: posting the
      receive (its kernel waits for the peer's send) blocks the host, which never reaches
      the compute and sends that the peer waits for.
    """
    found = []
    if environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
        found.append("CUDA_DEVICE_MAX_CONNECTIONS=1 puts every stream in one hardware queue, where a "
                     "receive posted early blocks the kernels queued after it; unset it (or set it to 8 "
                     "or more)")
    if environ.get("CUDA_LAUNCH_BLOCKING", "0") not in ("", "0"):
        found.append("CUDA_LAUNCH_BLOCKING=1 makes posting a receive wait until it landed, so this rank "
                     "never reaches the sends its peer waits for; unset it (it is for debugging kernels "
                     "one at a time)")
    return found


def _warn_serialising_settings() -> None:
    for why in _serialising_settings(os.environ):
        warnings.warn(f"tandem.comm.StageLink: {why}: pipeline ranks can wait on each other until "
                      "the timeout", RuntimeWarning, stacklevel=3)


class StageLink:
    """Send and receive activations and gradients between this stage and its neighbours.

    ``prev_rank`` / ``next_rank`` are ranks in ``comm``'s group (None at the first / last
    stage). Construction is collective: every rank of the group builds its StageLink, in the
    same order (each forks ``comm`` twice: forward and backward traffic get their own NCCL
    communicators and streams, or their own gloo tags, so a pending recv in one direction
    never blocks a send in the other; at pp=2 both directions can be in flight at once), and
    returns once its neighbours built theirs: one small message each way of each edge sets
    the connections up (NCCL connects a pair at its first send/recv, which would otherwise
    hold the first early-posted receive until the peer's first send).

    ``shapes="static"``: shape and dtype are agreed on the first message of each direction
    (a header travels once), receive buffers are preallocated and reused once the caller
    drops them, and a later tensor of another shape or dtype raises ValueError on the
    sending stage, which posts it on the error board: the receiving stage raises CommError
    with the same message. ``shapes="dynamic"``: an int64 header (ndim, dtype, shape)
    precedes every tensor; the receiver waits for it on the host.

    Sends return at once; the link keeps the tensor alive until the send completes. Do not
    modify a sent tensor in place before :meth:`wait_sends`. ``irecv_forward()`` /
    ``irecv_backward()`` post a receive and return a :class:`RecvHandle` (``wait()`` ->
    tensor, ``is_completed()``): post early, compute, then wait. Receives of one direction
    match the peer's sends in order. ``recv_*`` post and wait at once. Received tensors are
    ready (CPU) or ordered on the current stream (CUDA). Every wait is bounded by
    ``timeout`` (seconds; a wait may pass its own ``timeout=``): a peer that never answers
    raises CommTimeoutError (a TimeoutError) naming this stage, the peer stage and the
    operation; a peer that dies raises CommError; an error posted on the board (by
    :meth:`post_error`, or a shape mismatch) raises CommError with it within ~20 ms.

    The error board is a key in the job's torch.distributed store (``board_key``; pass
    ``store=None, board_key=""`` outside torch.distributed, the default then).
    """

    def __init__(self, comm: Communicator, prev_rank: Optional[int], next_rank: Optional[int], *,
                 shapes: str = "static", timeout: float = DEFAULT_TIMEOUT, store=None,
                 board_key: Optional[str] = None):
        if not isinstance(comm, Communicator):
            raise TypeError(f"StageLink: comm must be a tandem.comm.Communicator, got {type(comm).__name__}")
        self.comm = comm
        if board_key is None:
            store, board_key = _default_board(comm)
        self._impl = _C._StageLink(comm._impl, prev_rank, next_rank, shapes, float(timeout),
                                   store, board_key)
        if comm.backend == "nccl":  # its forks are NCCL communicators too: release them at exit
            _live_nccl.add(self)
            _warn_serialising_settings()

    @property
    def stage(self) -> int:
        return self._impl.stage

    @property
    def prev_rank(self) -> Optional[int]:
        return self._impl.prev_rank

    @property
    def next_rank(self) -> Optional[int]:
        return self._impl.next_rank

    @property
    def shapes(self) -> str:
        return self._impl.shapes

    @property
    def timeout(self) -> float:
        return self._impl.timeout

    @property
    def pending_sends(self) -> int:
        """Sends issued and not yet known to be complete."""
        return self._impl.pending_sends

    @property
    def board_key(self) -> str:
        """The store key of this link's error board ("" without one)."""
        return self._impl.board_key

    def abort(self) -> None:
        """Abort the link's communicators (local: never waits for a peer; all revoked first,
        so a fork whose stream waits behind another fork's stuck receive does not hold it
        up); later calls raise."""
        self._impl.abort()

    def synchronize(self, timeout: Optional[float] = None) -> None:
        """Block the host until every transfer posted on the link so far completed (at most
        ``timeout`` seconds, default the link's; reading the error board), then raise
        CommError if one failed, here or in its failure domain (the mesh's communicators).

        On CUDA a receive's ``wait()`` only orders streams: a receive that the watchdog
        aborted because its peer died ends with its buffer unfilled, and the stream runs on.
        When you drive a StageLink yourself, call ``link.synchronize()`` after a step's last
        transfer and before ``optimizer.step()``, so that such a step raises instead of
        updating the weights with what it never received. (``PipelineRunner.step()`` does
        this before it returns.)"""
        self._impl.synchronize(timeout)

    def release(self, timeout: Optional[float] = None) -> None:
        """A local end: each of the link's communicators waits for its transfers in flight
        (at most ``timeout`` seconds, default until their deadlines), then is destroyed, or
        aborted when they do not end in time or it failed. Later calls raise."""
        self._impl.release(timeout)

    def post_error(self, message: str) -> None:
        """Post ``message`` on the error board: peers waiting on this link raise it."""
        self._impl.post_error(message)

    def progress(self) -> None:
        """Put posted receives on the wire whose headers have landed (non-blocking; dynamic
        shapes): call it between computations so that the data lands early."""
        self._impl.progress()

    def irecv_forward(self) -> RecvHandle:
        """Post the receive of the next activation from the previous stage."""
        return self._impl.irecv_forward()

    def irecv_backward(self) -> RecvHandle:
        """Post the receive of the next gradient from the next stage."""
        return self._impl.irecv_backward()

    def send_forward(self, activation: Tensor) -> None:
        """Send an activation to the next stage."""
        self._impl.send_forward(activation)

    def recv_forward(self, timeout: Optional[float] = None) -> Tensor:
        """Receive an activation from the previous stage."""
        return self._impl.recv_forward(timeout)

    def send_backward(self, grad: Tensor) -> None:
        """Send a gradient to the previous stage."""
        self._impl.send_backward(grad)

    def recv_backward(self, timeout: Optional[float] = None) -> Tensor:
        """Receive a gradient from the next stage."""
        return self._impl.recv_backward(timeout)

    def send_forward_recv_backward(self, activation: Tensor, timeout: Optional[float] = None) -> Tensor:
        """Send an activation to the next stage and receive its gradient, both in flight at once."""
        return self._impl.send_forward_recv_backward(activation, timeout)

    def send_backward_recv_forward(self, grad: Tensor, timeout: Optional[float] = None) -> Tensor:
        """Send a gradient to the previous stage and receive its next activation, both in flight."""
        return self._impl.send_backward_recv_forward(grad, timeout)

    def wait_sends(self, timeout: Optional[float] = None) -> None:
        """Wait for every pending send (CUDA: the current stream waits); sent tensors are then free."""
        self._impl.wait_sends(timeout)

    def __repr__(self) -> str:
        return (f"StageLink(stage={self.stage}, prev_rank={self.prev_rank}, next_rank={self.next_rank}, "
                f"shapes={self.shapes!r}, timeout={self.timeout})")
