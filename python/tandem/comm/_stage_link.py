"""StageLink: the send/recv runtime between adjacent pipeline stages (C++ in csrc/p2p)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from tandem import _C
from tandem.comm._communicator import DEFAULT_TIMEOUT, Communicator

__all__ = ["StageLink"]


class StageLink:
    """Send and receive activations and gradients between this stage and its neighbours.

    ``prev_rank`` / ``next_rank`` are ranks in ``comm``'s group (None at the first / last
    stage). Construction is collective: every rank of the group builds its StageLink, in the
    same order (each forks ``comm`` twice: forward and backward traffic get their own NCCL
    communicator and stream, or their own gloo tag, so a pending recv in one direction never
    blocks a send in the other; at pp=2 both directions can be in flight at once).

    ``shapes="static"``: shape and dtype are agreed on the first message of each direction
    (a header travels once), receive buffers are preallocated and reused once the caller
    drops them, and a later tensor of another shape or dtype raises ValueError on the
    sending stage (its peer then times out waiting). ``shapes="dynamic"``: an int64 header
    (ndim, dtype, shape) precedes every tensor; the receiver waits for it on the host.

    Sends return at once; the link keeps the tensor alive until the send completes. Do not
    modify a sent tensor in place before :meth:`wait_sends`. Receives return the tensor
    (CPU: received; CUDA: ordered on the current stream). Every wait is bounded by
    ``timeout`` (seconds; a receive may pass its own ``timeout=``): a peer that never
    answers raises CommTimeoutError (a TimeoutError) naming this stage, the peer stage and
    the operation; a peer that dies raises CommError.
    """

    def __init__(self, comm: Communicator, prev_rank: Optional[int], next_rank: Optional[int], *,
                 shapes: str = "static", timeout: float = DEFAULT_TIMEOUT):
        if not isinstance(comm, Communicator):
            raise TypeError(f"StageLink: comm must be a tandem.comm.Communicator, got {type(comm).__name__}")
        self.comm = comm
        self._impl = _C._StageLink(comm._impl, prev_rank, next_rank, shapes, float(timeout))

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
