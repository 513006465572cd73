"""The agreement before a collective call (PipelineRunner, generate) waits on any peer:
every rank learns whether one of them refused its arguments, or whether they were called
with different settings, in one int64 MAX all-reduce per mesh dimension.

A rank that refuses still joins the all-reduces, so no collective is left half-issued and
no peer waits for a message that never comes: the refusing rank raises its own error, the
others a PipelineError with its message (posted on the error board first).
"""

from __future__ import annotations

import hashlib
import time
from typing import Optional, Sequence

import torch
from torch import Tensor

from tandem.pipeline._transport import ErrorBoard, PipelineError

__all__ = ["AGREE_TIMEOUT_S", "agree", "setting"]

AGREE_TIMEOUT_S = 300.0  # for the agreement when the caller's timeout is itself refused
_POLL_S = 0.05  # how often a waiting agreement looks for an aborted mesh in the store


def setting(value) -> int:
    """An int64 that stands for ``value`` in the agreement (small ints as they are, anything
    else as a 56-bit digest of its exact text or bytes)."""
    if isinstance(value, Tensor):
        data = value.detach().to("cpu", torch.int64).contiguous()
        raw = repr(tuple(data.shape)).encode() + data.numpy().tobytes()
    elif isinstance(value, int) and abs(value) < 1 << 62:
        return value
    else:
        raw = repr(value).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=7).digest(), "little")


def agree(mesh, dims: Sequence[str], board: ErrorBoard, refusal: Optional[BaseException],
          settings: dict[str, tuple[int, str]], timeout: float, who: str, what: str) -> None:
    """Before anything that waits on a peer: every rank of the mesh dimensions ``dims``
    ("pp", "tp", "dp", reduced in that order) learns whether one of them refused its call
    of ``what`` (its message is on ``board``), or whether they called it with different
    settings (``{name: (int64 stand-in, shown value)}``). The waits here do not stop early
    on the board: every rank joins every all-reduce. They stop when the mesh was aborted
    (a failed call on another rank, marked in the job's store: that rank never joins), and
    at ``timeout``, aborting the mesh."""
    mesh.check_aborted()
    # [refused, x1, -x1, x2, -x2, ...] maxed: every x agrees iff max(x) == -max(-x)
    flags = torch.tensor([int(refusal is not None)] + [v for x, _ in settings.values() for v in (x, -x)],
                         dtype=torch.int64, device=mesh.device)
    if refusal is not None:
        board.post(f"{who} refused {what}: {refusal}")
    for name in dims:
        if getattr(mesh, name) > 1:
            comm = getattr(mesh, f"{name}_comm")
            work = comm.all_reduce(flags, op="max")  # [1 + 2k] -> [1 + 2k] maxed over the group
            deadline = time.monotonic() + timeout
            while not work.wait_for(_POLL_S):
                mesh.check_aborted()  # raises: a peer's mesh was aborted, it will not come
                if time.monotonic() > deadline:
                    message = (f"{who}: {what}'s argument check over {name}: no answer within "
                               f"{timeout:g} s (does every rank of the pipeline call {what}?); "
                               f"the mesh's communicators were aborted")
                    mesh.abort(message)  # its collectives are out of step: later calls raise instead of mixing
                    raise PipelineError(message)
            work.wait()
    if refusal is not None:
        raise refusal  # this rank's own error (ValueError, TypeError, ...); its peers raise its message
    got = flags.tolist()
    if got[0]:
        board.check(force=True)  # raises the refusing rank's message
        raise PipelineError(f"{who}: another rank refused {what}'s arguments")
    differ = [name for i, name in enumerate(settings) if got[1 + 2 * i] != -got[2 + 2 * i]]
    if differ:
        mine = ", ".join(f"{name}={settings[name][1]}" for name in differ if settings[name][1])
        raise PipelineError(f"{who}: the ranks of the pipeline called {what} with different "
                            f"{', '.join(differ)}" + (f" (this rank: {mine})" if mine else ""))
