"""The runtime's point-to-point layer: sends, early-posted receives, bounded waits, and the
error board that makes every rank fail with a failing stage's error instead of hanging.

Messages between two ranks are matched in order (FIFO per direction, as gloo and NCCL
match them); the lowered action lists post them in the same order at both ends. A message
whose shape the receiver does not know (a stage's first forward output, or every one with
``shapes="dynamic"``) is preceded by a small header ``[dtype code, ndim, *shape]``; a
receive behind such a message is posted as soon as the header has landed, so FIFO order
holds. Every wait polls the error board and gives up after ``timeout`` seconds with an
error naming the operation and the peer.

Built on ``tandem.comm.Communicator`` (send / recv returning Work handles).
"""

from __future__ import annotations

import collections
import time
from typing import Optional

import torch
from torch import Tensor

__all__ = ["PipelineError", "ErrorBoard", "P2P"]

_MAX_DIMS = 8
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.uint8, torch.bool, torch.int8, torch.int16]
_CODE = {d: i for i, d in enumerate(_DTYPES)}
_CHECK_EVERY_S = 0.02


class PipelineError(RuntimeError):
    """A pipeline stage failed or a pipeline wait timed out; the message says which."""


class ErrorBoard:
    """One key in the job's torch.distributed store that a failing rank writes and every
    waiting rank reads. Without a store (a single process) it only checks locally."""

    def __init__(self, name: str):
        self.key = f"tandem/pipeline/{name}/error"
        self.store = None
        try:
            import torch.distributed as dist
            from torch.distributed import distributed_c10d as c10d

            if dist.is_initialized():
                self.store = c10d._get_default_store()
        except (ImportError, RuntimeError, AttributeError):  # no store: local checks only
            self.store = None
        self.error: Optional[str] = None
        self._next_check = 0.0

    def post(self, message: str) -> None:
        """Record the first failure for every rank to see."""
        if self.error is None:
            self.error = message
        if self.store is not None:
            try:
                self.store.compare_set(self.key, "", message)
            except Exception:  # the store is best effort: our own error is raised anyway
                pass

    def check(self, *, force: bool = False) -> None:
        """Raise PipelineError when some rank posted a failure (store read at most every 20 ms)."""
        if self.error is not None:
            raise PipelineError(self.error)
        now = time.monotonic()
        if self.store is None or (not force and now < self._next_check):
            return
        self._next_check = now + _CHECK_EVERY_S
        if self.store.check([self.key]):
            self.error = self.store.get(self.key).decode()
            raise PipelineError(self.error)


def wait(work, what: str, board: ErrorBoard, timeout: float, *, host: bool = True) -> None:
    """Wait for ``work``, checking ``board`` meanwhile; raise PipelineError after ``timeout``.

    ``host=False`` (CUDA tensors) only orders the current stream after the operation.
    """
    if not host:
        work.wait()
        return
    if not work.is_completed():
        deadline = time.monotonic() + timeout
        pause = 2e-5
        while not work.is_completed():
            board.check()
            if time.monotonic() > deadline:
                try:
                    work.wait(0.001)  # aborts the operation; raises CommTimeoutError
                except Exception as e:
                    raise PipelineError(f"{what}: no answer within {timeout:g} s ({e})") from None
                break
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
    try:
        work.wait()
    except Exception as e:
        board.check(force=True)  # a peer's failure explains ours
        raise PipelineError(f"{what}: {e}") from e


def _header(t: Tensor) -> Tensor:
    if t.dim() > _MAX_DIMS or t.dtype not in _CODE:
        raise PipelineError(f"cannot send a {t.dtype} tensor of {t.dim()} dims between stages "
                            f"(at most {_MAX_DIMS} dims, dtypes {', '.join(map(str, _DTYPES))})")
    h = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
    h[0], h[1] = _CODE[t.dtype], t.dim()
    h[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return h


class _Recv:
    __slots__ = ("key", "peer", "meta", "what", "header", "header_work", "buf", "work")

    def __init__(self, key, peer, meta, what):
        self.key, self.peer, self.meta, self.what = key, peer, meta, what
        self.header = self.header_work = self.buf = self.work = None


class P2P:
    """Sends and receives of one rank with its pipeline peers over ``comm``.

    ``post_recv(key, peer, meta)`` posts a receive (``meta = (shape, dtype)``, or None when
    a header precedes the data); ``take(key)`` waits for it and returns the tensor.
    ``send(t, peer, header)`` starts a send; ``finish()`` waits for every send.
    """

    def __init__(self, comm, *, board: ErrorBoard, timeout: float, device: torch.device,
                 who: str):
        self.comm, self.board, self.timeout = comm, board, timeout
        self.device, self.who = device, who
        self.host = device.type != "cuda"
        self._queued: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self._posted: dict = {}
        self._sends: collections.deque = collections.deque()

    def _wait(self, work, what: str, *, host: Optional[bool] = None) -> None:
        wait(work, f"{self.who}: {what}", self.board, self.timeout,
             host=self.host if host is None else host)

    # --- sends ----------------------------------------------------------------------------
    def send(self, t: Tensor, peer: int, *, header: bool, what: str) -> None:
        t = t.detach().contiguous()
        if header:
            h = _header(t).to(self.device)
            self._sends.append((self.comm.send(h, peer), h, f"header of {what} to rank {peer}"))
        self._sends.append((self.comm.send(t, peer), t, f"{what} to rank {peer}"))
        while self._sends and self._sends[0][0].is_completed():
            work, _, desc = self._sends.popleft()
            self._wait(work, f"send of {desc}")

    def finish(self) -> None:
        while self._sends:
            work, _, desc = self._sends.popleft()
            self._wait(work, f"send of {desc}", host=True)

    # --- receives ---------------------------------------------------------------------
    def post_recv(self, key, peer: int, meta: Optional[tuple], *, what: str) -> None:
        if key in self._posted:
            raise PipelineError(f"{self.who}: receive {what} posted twice")
        r = _Recv(key, peer, meta, what)
        self._posted[key] = r
        self._queued[peer].append(r)
        self.progress(peer)

    def progress(self, peer: Optional[int] = None) -> None:
        """Post the queued receives from ``peer`` (every peer when None) that can go now."""
        for p in ([peer] if peer is not None else list(self._queued)):
            q = self._queued[p]
            while q:
                r = q[0]
                if r.meta is None:
                    if r.header_work is None:
                        r.header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=self.device)
                        r.header_work = self.comm.recv(r.header, p)
                    if not r.header_work.is_completed():
                        break
                    self._wait(r.header_work, f"header of {r.what} from rank {p}", host=True)
                    r.meta = self._decode(r.header)
                shape, dtype = r.meta
                r.buf = torch.empty(shape, dtype=dtype, device=self.device)
                r.work = self.comm.recv(r.buf, p)
                q.popleft()

    @staticmethod
    def _decode(h: Tensor) -> tuple:
        h = h.cpu().tolist()
        return tuple(h[2:2 + h[1]]), _DTYPES[h[0]]

    def take(self, key) -> Tensor:
        """Wait for the receive ``key`` and return its tensor."""
        if key not in self._posted:
            raise PipelineError(f"{self.who}: the data of {key} was never posted for")
        r = self._posted.pop(key)
        while r.work is None:  # still queued behind a header
            head = self._queued[r.peer][0]
            if head.header_work is not None:
                self._wait(head.header_work, f"header of {head.what} from rank {r.peer}",
                           host=True)
            self.progress(r.peer)
        self._wait(r.work, f"receive of {r.what} from rank {r.peer}")
        return r.buf

    def meta_of(self, key) -> Optional[tuple]:
        """(shape, dtype) of a received message, once known."""
        entry = self._posted.get(key)
        return entry.meta if entry else None

    def pending(self) -> list[str]:
        return [r.what for r in self._posted.values()]
