"""Data parallelism: average gradients over the dp group, after the backward
(``all_reduce_grads``) or while it still runs (``OverlappedGradReducer``)."""

from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from tandem.mesh import Mesh, get_mesh

__all__ = ["all_reduce_grads", "OverlappedGradReducer"]

_BUCKET_BYTES = 32 << 20


def _split(tensors: list, limit: int) -> list[list]:
    """``tensors`` in order, cut into runs of one dtype and at most ``limit`` bytes each (a
    larger tensor forms a run of its own)."""
    runs, current, size = [], [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and (t.dtype != current[0].dtype or size + nbytes > limit):
            runs.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current:
        runs.append(current)
    return runs


def all_reduce_grads(params: Iterable[nn.Parameter], mesh: Optional[Mesh] = None) -> None:
    """Average the gradients of ``params`` over the dp group, in place.

    Gradients are flattened into buckets of one dtype (<= 32 MiB) and each bucket is one
    all-reduce; the buckets' all-reduces are all issued before the first is waited on.
    """
    mesh = mesh if mesh is not None else get_mesh()
    if mesh is None or mesh.dp == 1:
        return
    pending = []
    for bucket in _split([p.grad for p in params if p.grad is not None], _BUCKET_BYTES):
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
    __slots__ = ("params", "ready", "flat", "work")

    def __init__(self, params):
        self.params = params
        self.ready: set[int] = set()  # ids of parameters whose gradient is final
        self.flat = self.work = None


class OverlappedGradReducer:
    """Average gradients over the dp group while the backward still runs.

    ``groups``: lists of parameters, each bucketed on its own (a pipeline stage's parameters
    form one group). Buckets hold parameters in reverse order (the order a backward
    finishes them), one dtype each, at most ``bucket_bytes``. A group's buckets start their
    all-reduce on the dp communicator strictly in bucket order, each as soon as it and every
    bucket before it hold only final gradients, so every dp replica issues the same
    all-reduces in the same order; a parameter without a gradient travels as zeros.

    Two ways to learn that gradients are final:

    - :meth:`arm` ... :meth:`disarm` around a group's last backward, when nothing of it is
      deferred: a parameter is final when autograd accumulated into it (a post-accumulate-
      grad hook; AccumulateGrad runs once per parameter per backward);
    - :meth:`mark_final` (split backward: after the last B): every parameter that no
      deferred work still writes; then :meth:`mark_ready` as the deferred work (W) writes
      each parameter's last contribution.

    :meth:`flush_group` starts what is left of a group; :meth:`finish` waits for every
    all-reduce and writes the averages into ``param.grad``. :meth:`remove` drops the hooks.
    """

    def __init__(self, groups: Sequence[Sequence[nn.Parameter]], mesh: Mesh,
                 bucket_bytes: int = _BUCKET_BYTES):
        import weakref

        self.mesh = mesh
        self.groups: list[list[_Bucket]] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (group, bucket index)
        self._next: list[int] = []  # per group: the first bucket not started
        self._armed: set[int] = set()
        self._before: dict = {}  # id(param) -> (its .grad when armed, that grad's version)
        self._started: list[_Bucket] = []
        self.started_early = 0  # buckets started before flush_group in the last step
        me = weakref.ref(self)  # the hooks must not keep the reducer alive

        def hook(param):
            reducer = me()
            if reducer is not None:
                reducer._on_grad(param)

        self._hooks = []
        for index, params in enumerate(groups):
            buckets = [_Bucket(run) for run in _split([p for p in reversed(params) if p.requires_grad], bucket_bytes)]
            self.groups.append(buckets)
            self._next.append(0)
            for k, b in enumerate(buckets):
                for p in b.params:
                    self._where[id(p)] = (index, k)
                    self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def arm(self, group: int) -> None:
        """Gradients that autograd accumulates into ``group`` from now on are final."""
        self._armed.add(group)
        for b in self.groups[group]:
            for p in b.params:  # what .grad is now: the hook also fires when nothing arrived
                self._before[id(p)] = (p.grad, None if p.grad is None else p.grad._version)

    def disarm(self, group: int) -> None:
        self._armed.discard(group)

    def _on_grad(self, param) -> None:
        where = self._where.get(id(param))
        if where is None or where[0] not in self._armed:
            return
        grad, version = self._before.get(id(param), (None, None))
        if param.grad is None or (param.grad is grad and param.grad._version == version):
            return  # nothing arrived
        self.groups[where[0]][where[1]].ready.add(id(param))
        self._advance(where[0])

    def mark_final(self, group: int, pending) -> None:
        """Every parameter of ``group`` whose id is not in ``pending`` (ids that deferred
        work will still write) has its final gradient."""
        for b in self.groups[group][self._next[group]:]:
            b.ready.update(id(p) for p in b.params if id(p) not in pending)
        self._advance(group)

    def mark_ready(self, group: int, ids) -> None:
        """The parameters ``ids`` of ``group`` have their final gradients."""
        for i in ids:
            where = self._where.get(i)
            if where is not None and where[0] == group:
                self.groups[group][where[1]].ready.add(i)
        self._advance(group)

    def _advance(self, group: int) -> None:
        buckets = self.groups[group]
        while self._next[group] < len(buckets) and \
                len(buckets[self._next[group]].ready) == len(buckets[self._next[group]].params):
            self._start(buckets[self._next[group]])
            self._next[group] += 1
            self.started_early += 1

    def _start(self, b: _Bucket) -> None:
        # (sum of numels + one per parameter,): every parameter's gradient (zeros where there
        # is none), then 1 per parameter that has one: summed, the count of replicas with it
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in b.params]
        has = torch.tensor([p.grad is not None for p in b.params], dtype=grads[0].dtype, device=grads[0].device)
        b.flat = torch.cat(grads + [has])
        b.work = self.mesh.dp_comm.all_reduce(b.flat)  # summed over dp, asynchronously
        self._started.append(b)

    def flush_group(self, group: int) -> None:
        """Start every bucket of ``group`` not started yet; its gradients are final."""
        self.disarm(group)
        buckets = self.groups[group]
        while self._next[group] < len(buckets):
            self._start(buckets[self._next[group]])
            self._next[group] += 1

    def finish(self, wait=None) -> None:
        """Start what is left, wait for every all-reduce (``wait(work, what)`` when given,
        else ``work.wait()``), and write the dp averages into ``param.grad``."""
        for g in range(len(self.groups)):
            self.flush_group(g)
        try:
            with torch.no_grad():
                for b in self._started:
                    if wait is not None:
                        wait(b.work, "gradient all-reduce over dp")
                    else:
                        b.work.wait()
                # per parameter, the replicas that had a gradient: one host read for all buckets
                counts = iter(torch.cat([b.flat[-len(b.params):] for b in self._started]).tolist()
                              if self._started else [])
                for b in self._started:
                    b.flat.div_(self.mesh.dp)
                    offset = 0
                    for p in b.params:
                        count = next(counts)
                        avg = b.flat[offset:offset + p.numel()].view_as(p)
                        offset += p.numel()
                        if count == 0:
                            continue  # no replica had one: it stays None, as without dp
                        if p.grad is None:
                            p.grad = avg.clone()
                        else:
                            p.grad.copy_(avg)
        finally:
            self._clear()

    def begin_step(self) -> None:
        """Start a step: forget every bucket's state (also what a failed step left behind)."""
        self._clear()
        self.started_early = 0

    def _clear(self) -> None:
        for buckets in self.groups:
            for b in buckets:
                b.flat = b.work = None
                b.ready.clear()
        self._next = [0] * len(self.groups)
        self._started = []
        self._armed.clear()
        self._before.clear()

    def remove(self) -> None:
        """Remove the hooks (the reducer is done for good)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
