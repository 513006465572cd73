"""Data parallelism: average gradients over the dp group, after the backward
(``all_reduce_grads``) or while it still runs (``OverlappedGradReducer``)."""

from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from tandem.mesh import Mesh, get_mesh

__all__ = ["all_reduce_grads", "OverlappedGradReducer"]

_BUCKET_BYTES = 32 << 20


def all_reduce_grads(params: Iterable[nn.Parameter], mesh: Optional[Mesh] = None) -> None:
    """Average the gradients of ``params`` over the dp group, in place.

    Gradients are flattened into buckets of one dtype (<= 32 MiB) and each bucket is one
    all-reduce; the buckets' all-reduces are all issued before the first is waited on.
    """
    mesh = mesh if mesh is not None else get_mesh()
    if mesh is None or mesh.dp == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    buckets, current, size = [], [], 0
    for g in grads:
        if current and (g.dtype != current[0].dtype or size + g.numel() * g.element_size() > _BUCKET_BYTES):
            buckets.append(current)
            current, size = [], 0
        current.append(g)
        size += g.numel() * g.element_size()
    if current:
        buckets.append(current)
    pending = []
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])  # (sum of numels,)
        pending.append((bucket, flat, mesh.dp_comm.all_reduce(flat)))  # summed over dp
    for bucket, flat, work in pending:
        work.wait()
        flat.div_(mesh.dp)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


class _Bucket:
    __slots__ = ("params", "group", "ready", "flat", "grads", "work")

    def __init__(self, params, group):
        self.params, self.group = params, group
        self.ready: set[int] = set()  # ids of parameters whose gradient is final
        self.flat = self.grads = self.work = None


class OverlappedGradReducer:
    """Average gradients over the dp group while the backward still runs.

    ``groups``: lists of parameters, each bucketed on its own (a pipeline stage's parameters
    form one group). Buckets hold parameters in reverse order (the order a backward
    finishes them), one dtype each, at most ``bucket_bytes``. While a group is armed
    (:meth:`arm` ... :meth:`disarm`, around the actions that bring its parameters' last
    gradient contributions: the final backward, and with deferred weight gradients the
    final W), a parameter whose gradient changes is final: autograd's post-accumulate-grad
    hook and tandem.nn.wgrad's accumulation tell. A bucket whose parameters are all final
    starts its all-reduce on the dp communicator at once, overlapping the rest of the work.
    :meth:`flush_group` starts every bucket of a group not started yet (parameters that got
    no gradient). :meth:`finish` waits for every all-reduce and writes the averages back.
    Every dp replica must run the same backward (the same buckets start in the same order).
    """

    def __init__(self, groups: Sequence[Sequence[nn.Parameter]], mesh: Mesh,
                 bucket_bytes: int = _BUCKET_BYTES):
        from tandem.nn import wgrad

        self.mesh = mesh
        self.groups: list[list[_Bucket]] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._armed: set[int] = set()
        self._before: dict = {}  # id(param) -> (its .grad when armed, that grad's version)
        self._hooks = []
        self._started: list[_Bucket] = []
        self.started_early = 0  # buckets started before flush_group in the last step
        for index, params in enumerate(groups):
            buckets, current, size = [], [], 0
            for p in reversed([p for p in params if p.requires_grad]):
                nbytes = p.numel() * p.element_size()
                if current and (p.dtype != current[0].dtype or size + nbytes > bucket_bytes):
                    buckets.append(_Bucket(current, index))
                    current, size = [], 0
                current.append(p)
                size += nbytes
            if current:
                buckets.append(_Bucket(current, index))
            self.groups.append(buckets)
            for b in buckets:
                for p in b.params:
                    self._bucket_of[id(p)] = b
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._hooks.append(wgrad.on_accumulate(self._on_grad))

    def arm(self, group: int) -> None:
        """Gradients that change from now on in ``group`` are final."""
        self._armed.add(group)
        for b in self.groups[group]:
            for p in b.params:  # what .grad is now: the hook also fires when nothing arrived
                self._before[id(p)] = (p.grad, None if p.grad is None else p.grad._version)

    def disarm(self, group: int) -> None:
        self._armed.discard(group)

    def _on_grad(self, param) -> None:
        b = self._bucket_of.get(id(param))
        if b is None or b.work is not None or b.group not in self._armed:
            return
        grad, version = self._before.get(id(param), (None, None))
        if param.grad is None or (param.grad is grad and param.grad._version == version):
            return  # nothing arrived (a deferred weight gradient: W brings it)
        b.ready.add(id(param))
        if len(b.ready) == len(b.params):
            self._start(b)
            self.started_early += 1

    def _start(self, b: _Bucket) -> None:
        b.grads = [p.grad for p in b.params if p.grad is not None]
        if not b.grads:
            b.work = False  # nothing to reduce (the same on every replica)
            return
        b.flat = torch.cat([g.reshape(-1) for g in b.grads])  # (sum of numels,)
        b.work = self.mesh.dp_comm.all_reduce(b.flat)  # summed over dp, asynchronously
        self._started.append(b)

    def flush_group(self, group: int) -> None:
        """Start every bucket of ``group`` not started yet; its gradients are final."""
        self.disarm(group)
        for b in self.groups[group]:
            if b.work is None:
                self._start(b)

    def finish(self, wait=None) -> None:
        """Start what is left, wait for every all-reduce (``wait(work, what)`` when given,
        else ``work.wait()``), and write the dp averages into ``param.grad``."""
        for g in range(len(self.groups)):
            self.flush_group(g)
        for b in self._started:
            if wait is not None:
                wait(b.work, "gradient all-reduce over dp")
            else:
                b.work.wait()
            b.flat.div_(self.mesh.dp)
            offset = 0
            for g in b.grads:
                g.copy_(b.flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        for buckets in self.groups:
            for b in buckets:
                b.flat = b.grads = b.work = None
                b.ready.clear()
        self._started = []
        self._armed.clear()
        self._before.clear()

    def reset_counters(self) -> None:
        self.started_early = 0

    def remove(self) -> None:
        """Remove the hooks (the reducer is done for good)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
