"""The flat layout behind tandem's optimizers: gradient buckets, and each rank's shard of them.

Parameters are laid out in reverse order (the order a backward finishes them; see Layout) in
buckets of one dtype and at most ``bucket_bytes`` of fp32 gradient. Each bucket owns

- ``grad``: a flat fp32 buffer (numel padded to a multiple of the shard count); every
  parameter's ``main_grad`` is a view into it, where gradients accumulate over microbatches
  in fp32 whatever the parameter's dtype; after the dp reduction its owned range
  (``grad_shard``) holds the dp average (the rest is stale until zero_grad);
- a shard range: with ``shards = dp`` (ZeRO-1) dp rank r owns elements
  [r * n / dp, (r + 1) * n / dp) of every bucket; with ``shards = 1`` every rank owns all;
- ``master``: fp32 master weights of the owned range, and ``pieces``: for every parameter
  that overlaps the owned range, the overlap as (param, start, end in the flattened
  parameter, a view of ``master``).

Tied copies (a pipeline stage's copy of a weight tied to another stage) are laid out last,
so that the bucket holding them, which is final only after the tied gradients are summed
between stages, is the last to be reduced.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["Piece", "Bucket", "Layout", "is_tied_copy"]


def is_tied_copy(param: Tensor) -> bool:
    """Whether ``param`` is a pipeline stage's copy of a weight tied to another stage."""
    return bool(getattr(param, "_tandem_tied_copy", False))


class Piece:
    """The part [start, end) of a flattened parameter that this rank owns, and its fp32
    master ``master`` (a view of its bucket's master buffer; ``master.grad`` its gradient)."""

    __slots__ = ("param", "start", "end", "master", "bucket")

    def __init__(self, param: nn.Parameter, start: int, end: int, master: Tensor, bucket: "Bucket"):
        self.param, self.start, self.end, self.master, self.bucket = param, start, end, master, bucket

    @property
    def numel(self) -> int:
        return self.end - self.start


class Bucket:
    """Parameters whose gradients are reduced together (see the module docstring)."""

    def __init__(self, index: int, params: list, shards: int, shard: int, device):
        self.index, self.params = index, params
        self.dtype = params[0].dtype
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.real = n  # elements that belong to parameters
        self.numel = -(-n // shards) * shards  # padded: every shard the same size
        self.shards, self.shard = shards, shard
        self.shard_numel = self.numel // shards
        self.lo = shard * self.shard_numel  # owned range [lo, hi) of the bucket
        self.hi = self.lo + self.shard_numel
        self.grad = torch.zeros(self.numel, dtype=torch.float32, device=device)
        # where the owned range's reduced gradient lands: in place, the owned range of the
        # bucket (the whole bucket when unsharded), as Megatron-LM's distributed optimizer does
        self.grad_shard = self.grad if shards == 1 else self.grad[self.lo:self.hi]
        self.master = torch.zeros(self.shard_numel, dtype=torch.float32, device=device)
        self.pieces: list[Piece] = []
        with torch.no_grad():
            for p, off in zip(params, self.offsets):
                a, b = max(off, self.lo), min(off + p.numel(), self.hi)
                if a >= b:
                    continue
                master = self.master[a - self.lo:b - self.lo]
                master.copy_(p.detach().reshape(-1)[a - off:b - off])  # fp32 copy of the owned part
                master.grad = self.grad_shard[a - self.lo:b - self.lo]
                self.pieces.append(Piece(p, a - off, b - off, master, self))

    def main_grad_of(self, k: int) -> Tensor:
        p, off = self.params[k], self.offsets[k]
        return self.grad[off:off + p.numel()].view(p.shape)

    def __repr__(self) -> str:
        return (f"Bucket({self.index}: {len(self.params)} params, {self.real} elements + "
                f"{self.numel - self.real} padding, {self.dtype}, owns [{self.lo}, {self.hi}))")


class Layout:
    """Buckets over the parameters of ``groups`` (lists of parameters; see the module
    docstring); ``shards`` ranks share each bucket and this rank owns shard ``shard``.

    Order: each group's parameters reversed, group after group (weight-decay groups put the
    big weights first, and the small norms and biases, final only at the end of the
    backward, in a bucket of their own), tied copies last.
    """

    def __init__(self, groups: list, *, bucket_bytes: int, shards: int, shard: int,
                 device: Optional[torch.device] = None):
        params = [p for g in groups for p in g]
        if not params:
            raise ValueError("tandem.optim: no parameters to optimize")
        flat = [p for g in groups for p in reversed(g)]
        order = [p for p in flat if not is_tied_copy(p)] + [p for p in flat if is_tied_copy(p)]
        runs, current, size = [], [], 0
        for p in order:
            nbytes = 4 * p.numel()  # fp32 gradient bytes
            if current and (p.dtype != current[0].dtype or size + nbytes > bucket_bytes):
                runs.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            runs.append(current)
        device = device if device is not None else params[0].device
        self.buckets = [Bucket(i, run, shards, shard, device) for i, run in enumerate(runs)]
        self.where: dict[int, tuple[Bucket, int]] = {}  # id(param) -> (bucket, index in it)
        for b in self.buckets:
            for k, p in enumerate(b.params):
                self.where[id(p)] = (b, k)
        self.shards, self.shard = shards, shard

    @property
    def pieces(self) -> list[Piece]:
        return [pc for b in self.buckets for pc in b.pieces]

    def main_grad(self, param: Tensor) -> Tensor:
        b, k = self.where[id(param)]
        return b.main_grad_of(k)
