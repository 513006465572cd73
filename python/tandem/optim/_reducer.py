"""The dp reduction of a tandem optimizer's gradient buckets, started as each becomes final.

Unsharded (``MixedPrecisionOptimizer``): each bucket's fp32 gradient is all-reduced over dp
and averaged in place. Sharded (``DistributedOptimizer``, ZeRO-1): each bucket is
reduce-scattered; dp rank r receives the average of the r-th shard, the range whose master
weights it updates (over gloo an all-reduce of which rank r keeps its shard: gloo's
reduce-scatter cannot be waited on with a timeout in torch 2.14). ``reduce_dtype`` (default
fp32) is the dtype that travels.

Buckets start strictly in bucket order, so every dp replica issues the same collectives in
the same order. Readiness follows the protocol of ``tandem.dp.OverlappedGradReducer``, which
``PipelineRunner`` drives: ``arm``/``disarm`` around a stage's last backward (the optimizer's
post-accumulate-grad hook reports each parameter), ``mark_final``/``mark_ready`` for split
backwards, ``flush_group`` after a stage's last gradient work, and ``finish`` at the end of
the step (everything left, tied weights included, then the waits).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["BucketReducer"]


class BucketReducer:
    def __init__(self, optimizer, groups: Sequence[Sequence] = ()):
        self.opt = optimizer
        self.layout = optimizer.layout
        self.group_ids = [{id(p) for p in g if p.requires_grad} for g in groups]
        unknown = [p for g in groups for p in g if p.requires_grad and id(p) not in self.layout.where]
        if unknown:
            raise ValueError(f"tandem.optim: {len(unknown)} parameter(s) of the pipeline stages (first of shape "
                             f"{tuple(unknown[0].shape)}) are not managed by the optimizer; give it every "
                             "parameter of the stages (runner.parameters())")
        self.started_early = 0
        self.begin_step()

    # --- readiness ----------------------------------------------------------------------
    def begin_step(self) -> None:
        """Forget every bucket's state (also what a failed step left behind)."""
        self.ready = [set() for _ in self.layout.buckets]
        self.next = 0
        self.armed: set[int] = set()
        self.pending: list = []  # (bucket, work, send buffer) in start order
        self.started_early = 0

    def arm(self, group: int) -> None:
        self.armed |= self.group_ids[group]

    def disarm(self, group: int) -> None:
        self.armed -= self.group_ids[group]

    def on_grad(self, param) -> None:
        """Autograd accumulated a gradient into ``param`` (called by the optimizer's hook)."""
        if id(param) in self.armed:
            self._mark([id(param)])
            self._advance(early=True)

    def mark_final(self, group: int, pending) -> None:
        self._mark(i for i in self.group_ids[group] if i not in pending)
        self._advance(early=True)

    def mark_ready(self, group: int, ids) -> None:
        self._mark(i for i in ids if i in self.group_ids[group])
        self._advance(early=True)

    def flush_group(self, group: int) -> None:
        self.disarm(group)
        self._mark(self.group_ids[group])
        self._advance(early=False)

    def _mark(self, ids) -> None:
        for i in ids:
            b, _ = self.layout.where[i]
            self.ready[b.index].add(i)

    def _advance(self, early: bool) -> None:
        buckets = self.layout.buckets
        while self.next < len(buckets) and len(self.ready[self.next]) == len(buckets[self.next].params):
            self._start(buckets[self.next])
            self.next += 1
            self.started_early += early

    # --- communication ------------------------------------------------------------------
    def _start(self, b) -> None:
        mesh, dtype = self.opt.mesh, self.opt.reduce_dtype
        send = b.grad if dtype == torch.float32 else b.grad.to(dtype)  # (numel,)
        if b.shards == 1:
            work = mesh.dp_comm.all_reduce(send)  # (numel,) summed over dp, in place
            self.pending.append((b, work, send, None))
        elif "gloo" in mesh.dp_comm.backend:
            # gloo's reduce-scatter (torch 2.14) cannot be waited on with a timeout (its
            # is_completed() stays False), and a runner's waits are timed: all-reduce, keep the shard
            work = mesh.dp_comm.all_reduce(send)  # (numel,) summed over dp, in place
            self.pending.append((b, work, send, send.narrow(0, b.lo, b.shard_numel)))
        else:
            # in place (fp32): rank r's shard is its own range of the bucket, as NCCL allows
            out = b.grad_shard if dtype == torch.float32 else send.new_empty(b.shard_numel)
            # (numel,) = (dp * numel/dp,) summed over dp; rank r keeps rows [r*numel/dp, ...)
            work = mesh.dp_comm.reduce_scatter(out, send)
            self.pending.append((b, work, send, out))

    def finish(self, wait=None) -> None:
        """Start every bucket not started yet, wait for all (``wait(work, what)`` when
        given), and leave the dp average in each bucket's owned range."""
        for i, b in enumerate(self.layout.buckets):
            self.ready[i].update(id(p) for p in b.params)
        self._advance(early=False)
        try:
            with torch.no_grad():
                for b, work, send, out in self.pending:
                    if wait is not None:
                        wait(work, "gradient reduction over dp")
                    else:
                        work.wait()
                    dp = self.opt.mesh.dp
                    if out is None:  # all-reduced
                        if send.data_ptr() != b.grad.data_ptr():
                            b.grad.copy_(send)
                        b.grad.div_(dp)
                    else:  # reduce-scattered
                        if out.data_ptr() != b.grad_shard.data_ptr():
                            b.grad_shard.copy_(out)
                        b.grad_shard.div_(dp)
        finally:
            self.pending = []
        self.opt._grads_reduced = True

    def remove(self) -> None:
        """Nothing to remove: the hooks belong to the optimizer."""
