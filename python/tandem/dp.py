"""Data parallelism: average gradients over the dp group after backward."""

from typing import Iterable, Optional

import torch
from torch import nn

from tandem.mesh import Mesh, get_mesh

__all__ = ["all_reduce_grads"]

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
