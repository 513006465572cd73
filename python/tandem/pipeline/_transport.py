"""The runtime's point-to-point layer: activations and gradients over the C++ StageLink
(receives posted early, taken by key), bounded waits, and the error board that makes every
rank fail with a failing stage's error instead of hanging.

Messages of one direction between two ranks match in order; the lowered action lists post
them in the same order at both ends. StageLink's waits read the same error board (one key
in the job's store) as the runner's other waits, so a failure anywhere ends every wait
within ~20 ms.
"""

from __future__ import annotations

import time
from typing import Optional

from torch import Tensor

__all__ = ["PipelineError", "ErrorBoard", "StageTraffic", "wait", "fail_every_rank"]

_CHECK_EVERY_S = 0.02


class PipelineError(RuntimeError):
    """A pipeline stage failed or a pipeline wait timed out; the message says which."""


class ErrorBoard:
    """One key in the job's torch.distributed store that a failing rank writes and every
    waiting rank reads (the C++ ErrorBoard that StageLink's waits read too). Without a store
    (a single process) it only checks locally."""

    def __init__(self, key: str):
        from tandem import _C
        from tandem.mesh import job_store

        self.key = key
        self.store = job_store()  # None: local checks only
        self._impl = _C._ErrorBoard(self.store, self.key)

    def post(self, message: str) -> None:
        """Record the first failure for every rank to see (the store is best effort)."""
        self._impl.post(message)

    def check(self, *, force: bool = False) -> None:
        """Raise PipelineError when some rank posted a failure (store read at most every 20 ms)."""
        from tandem.comm import CommError

        try:
            self._impl.check(force)
        except CommError as e:
            raise PipelineError(str(e)) from None


def fail_every_rank(e: BaseException, who: str, board: ErrorBoard, mesh, link=None) -> BaseException:
    """After ``e`` ended a collective call (a runner's step, generate): post its message for
    every rank (the board keeps the first), abort ``link`` and the mesh (operations of the
    call may still be posted on them: later calls raise instead of matching those) and
    return what to raise: a PipelineError for any Exception, ``e`` itself otherwise
    (KeyboardInterrupt, SystemExit). ``who`` begins the message of a non-pipeline error."""
    if isinstance(e, PipelineError):
        message = str(e)
    elif isinstance(e, Exception):
        message = f"{who}: {type(e).__name__}: {e}"
    else:  # its peers stop too, then it goes on as it is
        message = f"{who}: stopped by {type(e).__name__}"
    board.post(message)
    mesh.abort(message)  # first: it revokes the link's forks with the mesh's communicators
    if link is not None:
        link.abort()
    if isinstance(e, Exception) and not isinstance(e, PipelineError):
        error = PipelineError(message)
        error.__cause__ = e
        return error
    return e


def wait(work, what: str, board: ErrorBoard, timeout: float, *, host: bool = True) -> None:
    """Wait for ``work``, checking ``board`` meanwhile; raise PipelineError after ``timeout``.

    ``host=False`` (CUDA tensors) only orders the current stream after the operation.
    """
    if not host:
        work.wait()
        return
    deadline = time.monotonic() + timeout
    while not work.wait_for(_CHECK_EVERY_S):  # the host blocks in C++, a slice at a time
        board.check()
        if time.monotonic() > deadline:  # the operation stays posted; the caller's call fails
            raise PipelineError(f"{what}: no answer within {timeout:g} s")
    try:
        work.wait()
    except Exception as e:
        board.check(force=True)  # a peer's failure explains ours
        raise PipelineError(f"{what}: {e}") from e


class StageTraffic:
    """This rank's activations and gradients with its neighbours over one StageLink.

    ``post_recv(key, forward=...)`` posts a receive (from the previous rank for forward
    traffic, from the next for backward); ``take(key)`` waits for it and returns the tensor.
    ``send(t, forward=...)`` starts a send; ``finish()`` waits for every send. Errors come
    back as PipelineError naming this rank, the message and the peer.
    """

    def __init__(self, comm, prev_rank: Optional[int], next_rank: Optional[int], *,
                 board: ErrorBoard, timeout: float, shapes: str, who: str):
        from tandem.comm import StageLink

        self.board, self.who = board, who
        self.link = StageLink(comm, prev_rank, next_rank, shapes=shapes, timeout=timeout,
                              store=board.store, board_key=board.key)
        self._posted: dict = {}

    def _failed(self, what: str, e: Exception) -> PipelineError:
        try:
            self.board.check(force=True)  # a peer's failure explains ours
        except PipelineError as posted:
            return posted
        return PipelineError(f"{self.who}: {what}: {e}")

    def post_recv(self, key, *, forward: bool, what: str) -> None:
        if key in self._posted:
            raise PipelineError(f"{self.who}: receive {what} posted twice")
        try:
            handle = self.link.irecv_forward() if forward else self.link.irecv_backward()
        except RuntimeError as e:
            raise self._failed(f"posting {what}", e) from e
        self._posted[key] = (handle, what)

    def take(self, key) -> Tensor:
        """Wait for the receive ``key`` and return its tensor."""
        if key not in self._posted:
            raise PipelineError(f"{self.who}: the data of {key} was never posted for")
        handle, what = self._posted.pop(key)
        try:
            return handle.wait()
        except RuntimeError as e:
            raise self._failed(f"receive of {what}", e) from e

    def send(self, t: Tensor, *, forward: bool, what: str) -> None:
        t = t.detach()
        try:
            self.link.send_forward(t) if forward else self.link.send_backward(t)
        except ValueError:
            raise  # bad input (a static-shape mismatch): the stage's own error
        except RuntimeError as e:
            raise self._failed(f"send of {what}", e) from e

    def finish(self) -> None:
        try:
            self.link.wait_sends()
        except RuntimeError as e:
            raise self._failed("waiting for sends", e) from e
