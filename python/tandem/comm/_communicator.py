"""Communicator: collectives and point-to-point over a torch.distributed group, in C++.

Two backends behind one interface, chosen by device: CUDA tensors go through tandem's own
NCCL communicator on its own high-priority comm stream (ordered against the caller's
stream with CUDA events only); CPU tensors go through the group's c10d ProcessGroup
(gloo), so every scheduling path runs in CPU tests.
"""

from __future__ import annotations

import atexit
import math
import weakref
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from tandem import _C

__all__ = ["Communicator", "Work", "CommError", "CommTimeoutError", "DEFAULT_TIMEOUT", "abort_all"]

Work = _C.Work
CommError = _C.CommError
CommTimeoutError = _C.CommTimeoutError

DEFAULT_TIMEOUT = 300.0  # seconds


def _nccl_bootstrap(group, device: torch.device, timeout: float):
    """Rank 0 of ``group`` makes an ncclUniqueId; the group broadcasts it; all create the comm."""
    if not hasattr(_C, "_nccl_communicator"):
        raise RuntimeError("tandem.comm: this tandem core was built without CUDA/NCCL; "
                           "use a CPU device (c10d backend) or rebuild with CUDA")
    rank = dist.get_rank(group)
    uid = _C._nccl_unique_id() if rank == 0 else None
    objects = [uid]
    # any backend of the group can carry 128 bytes; NCCL-only groups need the CUDA device
    backend = str(dist.get_backend(group))
    carrier = torch.device("cpu") if "gloo" in backend else device
    dist.broadcast_object_list(objects, group_src=0, group=group, device=carrier)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _C._nccl_communicator(objects[0], rank, dist.get_world_size(group), index, float(timeout))


_live_nccl: "weakref.WeakSet[Communicator]" = weakref.WeakSet()


@atexit.register
def _release_live_nccl() -> None:
    """At interpreter exit, release NCCL communicators (and StageLinks) still alive
    (globals, cycles): their watchdog threads must not poll CUDA and NCCL while those tear
    down. A healthy one first waits for its operations in flight (their peers are waiting
    for them; at most until their deadlines), then is destroyed; a failed one, or one whose
    operations do not end in time, is aborted."""
    for comm in list(_live_nccl):
        try:
            comm.release()
        except Exception:  # exiting anyway: nothing left to report it to
            pass


def abort_all(comms: Iterable[object]) -> None:
    """Abort every communicator in ``comms`` and every NCCL communicator sharing a failure
    domain with one of them (see :meth:`Communicator.share_failure_domain`; a communicator's
    forks, StageLinks' included, share its domain). Other objects in ``comms`` are aborted
    by their own ``abort()``, after the communicators. Local: never waits for a peer.

    NCCL's abort synchronises the communicator's streams, which wait for the caller's
    stream, which may wait for a receive of another communicator from a dead peer: aborted
    one by one, each would wait for the next one's watchdog. So all are revoked first (NCCL
    2.27+: their kernels exit at once), then aborted. Later operations on them raise."""
    impls, others = [], []
    for c in comms:
        impl = c._impl if isinstance(c, Communicator) else c
        (impls if isinstance(impl, _C._Communicator) else others).append(impl)
    _C._abort_all(impls, True)
    for other in others:
        other.abort()


class Communicator:
    """Collectives and p2p among the ranks of ``group`` (a torch.distributed ProcessGroup).

    ``device`` picks the backend: ``cuda`` -> tandem's NCCL communicator (collective
    construction: every rank of the group must create it, in the same order as its other
    Communicators); ``cpu`` -> the group's c10d backend (gloo). ``timeout`` (seconds) bounds
    every wait; an operation that does not finish in time raises CommTimeoutError naming this
    rank, the peer and the operation. ``backend="c10d"`` forces the c10d path on any device.

    Every operation is asynchronous and returns a :class:`Work` (``wait()``,
    ``synchronize()``, ``is_completed()``). Tensors must be contiguous and on ``device``.
    """

    def __init__(self, group=None, device: Union[torch.device, str] = "cpu", *,
                 timeout: float = DEFAULT_TIMEOUT, backend: Optional[str] = None, _impl=None):
        if _impl is not None:
            self._impl = _impl
            self.group = group
            if self.backend == "nccl":
                _live_nccl.add(self)
            return
        group = group if group is not None else dist.group.WORLD
        if group is None:
            raise RuntimeError("tandem.comm.Communicator: torch.distributed is not initialised; "
                               "call dist.init_process_group first or pass a group")
        device = torch.device(device)
        if not timeout or timeout <= 0:
            raise ValueError(f"tandem.comm.Communicator: timeout must be positive seconds, got {timeout}")
        backend = backend or ("nccl" if device.type == "cuda" else "c10d")
        if backend == "nccl":
            if device.type != "cuda":
                raise ValueError(f"tandem.comm.Communicator: the nccl backend needs a CUDA device, got {device}")
            self._impl = _nccl_bootstrap(group, device, timeout)
            _live_nccl.add(self)
        elif backend == "c10d":
            self._impl = _C._c10d_communicator(group, str(device), float(timeout))
        else:
            raise ValueError(f'tandem.comm.Communicator: backend must be "nccl" or "c10d", got "{backend}"')
        self.group = group

    # --- identity ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This rank's index in the group."""
        return self._impl.rank

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        return self._impl.size

    @property
    def device(self) -> torch.device:
        return torch.device(self._impl.device)

    @property
    def timeout(self) -> float:
        return self._impl.timeout

    @property
    def backend(self) -> str:
        """``"nccl"`` or ``"c10d:<backend of the group>"``."""
        return self._impl.backend

    def __repr__(self) -> str:
        return f"Communicator({self._impl.who()}, backend={self.backend}, device={self.device})"

    # --- collectives ------------------------------------------------------------------
    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Work:
        """Reduce ``tensor`` over the group in place (op: sum | prod | max | min)."""
        return self._impl.all_reduce(tensor, op)

    def all_gather(self, out: Tensor, inp: Tensor) -> Work:
        """``inp`` [n0, ...] of every rank -> ``out`` [size * n0, ...], rank r's rows at r*n0."""
        return self._impl.all_gather(out, inp)

    def reduce_scatter(self, out: Tensor, inp: Tensor, op: str = "sum") -> Work:
        """``inp`` [size * n0, ...] reduced over ranks; rank r keeps rows [r*n0, (r+1)*n0) in ``out``."""
        return self._impl.reduce_scatter(out, inp, op)

    # --- point to point ---------------------------------------------------------------
    def send(self, tensor: Tensor, dst: int) -> Work:
        """Send ``tensor`` to group rank ``dst``."""
        return self._impl.send(tensor, dst)

    def recv(self, tensor: Tensor, src: int) -> Work:
        """Receive into ``tensor`` from group rank ``src``."""
        return self._impl.recv(tensor, src)

    def batch_p2p(self, ops: Sequence[tuple[str, Tensor, int]]) -> list[Work]:
        """Issue ``[("send"|"recv", tensor, peer), ...]`` together; one Work per op.

        NCCL: one group (sends and recvs progress together; a send to this rank pairs with a
        recv from it). c10d: posted in list order, recvs first.
        """
        return self._impl.batch_p2p([(kind, t, int(peer)) for kind, t, peer in ops])

    # --- lifetime ---------------------------------------------------------------------
    def fork(self, timeout: Optional[float] = None) -> "Communicator":
        """A communicator over the same ranks whose operations are ordered independently of
        this one's (NCCL: ncclCommSplit with its own comm stream; c10d: its own p2p tag),
        with default timeout ``timeout`` seconds (None: this one's). Collective: every rank
        of the group forks in the same order."""
        if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout)
                                        and timeout > 0):
            raise ValueError(f"Communicator.fork: timeout must be a finite number of seconds > 0, got {timeout!r}")
        return Communicator(self.group, _impl=self._impl.fork(timeout))

    def abort(self) -> None:
        """Tear the communicator down (local, never waits for a peer): pending and later
        operations raise CommError. NCCL: revoke, then abort, outside the communicator's
        lock, so calls from other threads (``is_completed``, ``check``) never wait for it.
        To abort several whose streams depend on each other, use :func:`abort_all`."""
        self._impl.abort()

    def release(self, timeout: Optional[float] = None) -> None:
        """A local end. NCCL: the host waits for this communicator's operations in flight
        (at most ``timeout`` seconds, default until their own deadlines), then destroys it;
        it is aborted instead when they do not end in time or it failed (pending operations
        would otherwise end without communicating, and their peers hang). Dropping a
        communicator, and interpreter exit, release it. c10d: like :meth:`close`."""
        self._impl.release(timeout)

    def synchronize(self, timeout: Optional[float] = None) -> None:
        """Block the host until every operation posted so far completed (at most
        ``timeout`` seconds, default the communicator's; CommTimeoutError past it), then
        raise if it, or a communicator of its failure domain, failed. On CUDA a Work's
        ``wait()`` only orders streams: an operation the watchdog aborted (a peer died) ends
        with its output unfilled; call this before using results on the host or stepping an
        optimizer on them. c10d: raises a recorded failure (its waits are host waits)."""
        self._impl.synchronize(timeout)

    def share_failure_domain(self, other: "Communicator") -> None:
        """Put ``other`` (and its forks) in this communicator's failure domain: once one of
        them fails (an NCCL error, a watchdog timeout), every later operation, wait, check
        and synchronize of each raises, naming the first failure. A mesh shares one domain
        over its communicators. NCCL only (a no-op for c10d)."""
        _C._share_failure_domain(self._impl, other._impl)

    def close(self, timeout: Optional[float] = None) -> None:
        """An orderly end (collective: every rank closes). NCCL: finalize, which waits for
        this communicator's pending operations on every rank (at most ``timeout`` seconds,
        default the communicator's; past it the communicator is aborted and
        CommTimeoutError raised), then destroy. c10d: later operations raise; the group
        stays the caller's. A communicator dropped without close() is released (local: see
        :meth:`release`)."""
        self._impl.close(timeout)

    def check(self) -> None:
        """Raise the pending asynchronous error (NCCL), if any, or the failure of a
        communicator of its failure domain (no host wait: see :meth:`synchronize`)."""
        self._impl.check()
