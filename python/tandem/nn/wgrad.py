"""Deferred weight gradients: the W of zero-bubble pipeline schedules.

Inside ``defer_weight_grads(bucket)``, the backward of tandem's linear layers computes the
input gradient (B) at once and appends the weight-gradient GEMM to ``bucket`` instead of
running it; ``flush(bucket)`` runs them later (W) and accumulates into ``param.grad``.
Outside the context every gradient is computed at once, as usual. Layers that do not use
this (LayerNorm, biases, user modules) get their gradients in B.

The switch is process-wide, not thread-local: autograd may run a backward on a device thread.
"""

from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

__all__ = ["defer_weight_grads", "deferring", "flush", "weight_grad", "linear"]

_bucket: Optional[list] = None


@contextmanager
def defer_weight_grads(bucket: list):
    """Weight-gradient GEMMs of the backward run in this context go to ``bucket``."""
    global _bucket
    previous, _bucket = _bucket, bucket
    try:
        yield bucket
    finally:
        _bucket = previous


def deferring() -> bool:
    """Whether weight-gradient GEMMs are being deferred right now."""
    return _bucket is not None


def flush(bucket: list) -> None:
    """Run the deferred weight-gradient GEMMs of ``bucket`` (W), in order, and empty it."""
    for fn in bucket:
        fn()
    bucket.clear()


def _accumulate(param: Tensor, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


def weight_grad(param: Tensor, compute: Callable[[], Tensor]) -> Optional[Tensor]:
    """The gradient of ``param`` for a custom Function's backward to return: ``compute()`` now,
    or None while deferring (then ``compute()`` runs at flush and accumulates into
    ``param.grad``). ``param`` must be a leaf (a Parameter)."""
    if _bucket is None or not param.is_leaf:
        return compute()
    _bucket.append(lambda: _accumulate(param, compute()))
    return None


class _Linear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.weight, ctx.has_bias = weight, bias is not None
        return F.linear(x, weight, bias)  # (.., K) @ (K, N) + (N) -> (.., N)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        grad_x = grad @ w if ctx.needs_input_grad[0] else None  # (.., N) @ (N, K) -> (.., K)
        grad_w = None
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            grad_w = weight_grad(ctx.weight, lambda: g.t() @ x2)  # (N, M) @ (M, K) -> (N, K)
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear whose weight gradient can be deferred (see module docstring)."""
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)
