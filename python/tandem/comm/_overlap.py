"""Tensor-parallel linear layers' GEMMs overlapped with their all-reduce (C++ in csrc/overlap)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tandem import _C
from tandem.comm._communicator import Communicator
from tandem.nn.wgrad import deferring, weight_grad

__all__ = ["row_parallel_linear", "column_parallel_backward", "column_parallel_linear"]


def _impl(comm) -> object:
    if not isinstance(comm, Communicator):
        raise TypeError(f"expected a tandem.comm.Communicator, got {type(comm).__name__}")
    return comm._impl


class _RowParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, comm, chunks):
        ctx.save_for_backward(input, weight)
        ctx.bias, ctx.weight = bias, weight
        return _C._row_parallel_linear_forward(input, weight, bias, _impl(comm), int(chunks))

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        # The all-reduce's backward is the identity (every rank holds the full grad_output):
        # only the local linear's backward, no communication.
        g = grad_output.reshape(-1, grad_output.shape[-1])  # (M, N)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # (M, N) @ (N, K/tp) -> (M, K/tp)
            grad_input = (g @ weight).view(*input.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            # (N, M) @ (M, K/tp) -> (N, K/tp), now or deferred to W (zero-bubble schedules)
            grad_weight = weight_grad(ctx.weight, lambda: g.t() @ input.reshape(-1, input.shape[-1]))
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            grad_bias = weight_grad(ctx.bias, lambda: g.sum(0))  # (M, N) -> (N), now or in W
        return grad_input, grad_weight, grad_bias, None, None


def row_parallel_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], comm: Communicator,
                        chunks: int = 1) -> Tensor:
    """Row-parallel linear: ``all_reduce(input @ weight.T) + bias`` with compute/comm overlap.

    input [..., K/tp] (this rank's slice of the features), weight [N, K/tp], bias [N]
    (replicated) -> [..., N], identical on every rank of ``comm``. The tokens are cut into
    ``chunks`` row blocks (sizes differ by at most one; any token count works); the GEMM of
    block i runs on the current stream while block i-1 is all-reduced on the comm stream
    (CPU: on gloo's thread). Equal to the non-overlapped computation up to the order of the
    all-reduce's additions. Differentiable in input, weight and bias: the backward is the
    local linear backward (the all-reduce's adjoint is the identity).
    """
    return _RowParallelLinear.apply(input, weight, bias, comm, chunks)


def column_parallel_backward(grad_output: Tensor, input: Tensor, weight: Tensor, comm: Communicator, *,
                             weight_grad: bool = True, bias_grad: bool = True
                             ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Backward of a column-parallel linear ``y = input @ weight.T (+ bias)``, overlapped.

    Args:
        grad_output: [..., N/tp], the gradient of this rank's output columns.
        input: [..., K], the layer's input (replicated over the tp group).
        weight: [N/tp, K], this rank's rows of the weight.
        comm: the tensor-parallel Communicator.
        weight_grad: compute grad_weight now (False: the caller defers W, e.g. zero-bubble).
        bias_grad: compute grad_bias.

    Returns ``(grad_input [..., K], grad_weight [N/tp, K] or None, grad_bias [N/tp] or None)``.
    grad_input = all_reduce(grad_output @ weight) over tp; its all-reduce runs on the comm
    stream while the weight-gradient GEMM ``grad_output^T @ input`` runs (Megatron's
    asynchronous grad all-reduce).
    """
    return tuple(_C._column_parallel_backward(grad_output, input, weight, _impl(comm), bool(weight_grad),
                                              bool(bias_grad)))


class _ColumnParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, comm):
        ctx.save_for_backward(input, weight)
        ctx.comm, ctx.bias, ctx.weight = comm, bias, weight
        # (..., K) @ (K, N/tp) -> (..., N/tp); the input is the same on every tp rank
        return torch.nn.functional.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        defer = deferring()
        need_w = ctx.needs_input_grad[1]
        need_b = ctx.bias is not None and ctx.needs_input_grad[2]
        grad_input, grad_weight, grad_bias = column_parallel_backward(
            grad_output, input, weight, ctx.comm, weight_grad=need_w and not defer, bias_grad=need_b and not defer)
        if defer:  # W later: (N/tp, M) @ (M, K), and the bias's (M, N/tp) -> (N/tp)
            g, x = grad_output.reshape(-1, grad_output.shape[-1]), input.reshape(-1, input.shape[-1])
            if need_w:
                grad_weight = weight_grad(ctx.weight, lambda: g.t() @ x)
            if need_b:
                grad_bias = weight_grad(ctx.bias, lambda: g.sum(0))
        return grad_input, grad_weight, grad_bias, None


def column_parallel_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], comm: Communicator) -> Tensor:
    """Column-parallel linear: input [..., K] (replicated) x weight [N/tp, K] -> [..., N/tp] + bias.

    Its backward is :func:`column_parallel_backward` (grad_input all-reduced over tp, the
    all-reduce overlapped with the weight-gradient GEMM).
    """
    return _ColumnParallelLinear.apply(input, weight, bias, comm)
