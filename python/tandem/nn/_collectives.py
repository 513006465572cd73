"""Autograd-aware collectives over the TP group: Megatron's conjugate operators.

    f = copy_to_tp        forward: identity         backward: all-reduce
    g = reduce_from_tp    forward: all-reduce       backward: identity
    gather_from_tp        forward: all-gather dim   backward: keep own slice
    scatter_to_tp         forward: keep own slice   backward: all-gather dim
    gather_from_sp        forward: all-gather dim   backward: reduce-scatter   (sequence parallel)
    reduce_scatter_to_sp  forward: reduce-scatter   backward: all-gather
    reduce_grad           forward: identity on a parameter, backward: all-reduce its grad

``comm`` is a tandem Communicator; ``None`` means tp = 1, where every operator is identity.
"""

from typing import Optional

from torch import Tensor
from torch.autograd import Function

__all__ = ["copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp", "gather_from_sp",
           "reduce_scatter_to_sp", "scatter_to_sp", "reduce_grad", "all_reduce", "all_gather",
           "reduce_scatter", "split"]


def all_reduce(x: Tensor, comm, op: str = "sum") -> Tensor:
    x = x.contiguous()
    comm.all_reduce(x, op=op).wait()  # (...) -> (...) summed over tp, in place
    return x


def all_gather(x: Tensor, comm, dim: int) -> Tensor:
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((comm.size * x0.shape[0], *x0.shape[1:]))
    comm.all_gather(out, x0).wait()  # (n, ...) per rank -> (tp*n, ...), rank r at rows r*n..
    return out.movedim(0, dim).contiguous()


def reduce_scatter(x: Tensor, comm, dim: int) -> Tensor:
    x0 = x.movedim(dim, 0).contiguous()
    if x0.shape[0] % comm.size:
        raise ValueError(f"reduce-scatter over tp={comm.size}: dimension {dim} of shape {tuple(x.shape)} "
                         f"is not divisible by {comm.size}")
    n = x0.shape[0] // comm.size
    if "gloo" in comm.backend:
        # gloo's reduce-scatter (torch 2.14) never reports completion to a timed wait (its
        # is_completed() stays False), so inside a pipeline call, whose waits are watched, it
        # cannot be waited on: an all-reduce of which each rank keeps its block is the same sum
        full = x0.clone()
        comm.all_reduce(full).wait()  # (tp*n, ...) summed over tp
        return full.narrow(0, comm.rank * n, n).movedim(0, dim).contiguous()  # chunk r on rank r
    out = x0.new_empty((n, *x0.shape[1:]))
    comm.reduce_scatter(out, x0).wait()  # (tp*n, ...) -> (n, ...) summed, chunk r on rank r
    return out.movedim(0, dim).contiguous()


def split(x: Tensor, comm, dim: int) -> Tensor:
    size = x.shape[dim]
    if size % comm.size:
        raise ValueError(f"split over tp={comm.size}: dimension {dim} of shape {tuple(x.shape)} "
                         f"is not divisible by {comm.size}")
    return x.narrow(dim, comm.rank * (size // comm.size), size // comm.size).contiguous()


class _CopyToTP(Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.comm), None


class _ReduceFromTP(Function):
    @staticmethod
    def forward(ctx, x, comm):
        return all_reduce(x.clone(), comm)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return all_gather(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, ctx.comm, ctx.dim), None, None


class _ScatterToTP(Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return split(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.comm, ctx.dim), None, None


class _GatherFromSP(Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return all_gather(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.comm, ctx.dim), None, None


class _ReduceScatterToSP(Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return reduce_scatter(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.comm, ctx.dim), None, None


def copy_to_tp(x: Tensor, comm) -> Tensor:
    return x if comm is None else _CopyToTP.apply(x, comm)


def reduce_from_tp(x: Tensor, comm) -> Tensor:
    return x if comm is None else _ReduceFromTP.apply(x, comm)


def gather_from_tp(x: Tensor, comm, dim: int = -1) -> Tensor:
    return x if comm is None else _GatherFromTP.apply(x, comm, dim % x.dim())


def scatter_to_tp(x: Tensor, comm, dim: int = -1) -> Tensor:
    return x if comm is None else _ScatterToTP.apply(x, comm, dim % x.dim())


def gather_from_sp(x: Tensor, comm, dim: int = 1) -> Tensor:
    return x if comm is None else _GatherFromSP.apply(x, comm, dim % x.dim())


def reduce_scatter_to_sp(x: Tensor, comm, dim: int = 1) -> Tensor:
    return x if comm is None else _ReduceScatterToSP.apply(x, comm, dim % x.dim())


def scatter_to_sp(x: Tensor, comm, dim: int = 1) -> Tensor:
    """Cut the sequence dimension: the entry into a sequence-parallel region."""
    return scatter_to_tp(x, comm, dim)


def reduce_grad(p: Optional[Tensor], comm) -> Optional[Tensor]:
    """A parameter whose gradient is summed over tp in backward (sequence-parallel regions)."""
    # the f operator applied to a parameter: identity forward, all-reduce of the gradient
    return p if (comm is None or p is None) else _CopyToTP.apply(p, comm)
