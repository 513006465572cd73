"""Deferred weight gradients: the W of zero-bubble pipeline schedules.

Inside ``defer_weight_grads(bucket)``, the backward of tandem's layers computes the input
gradient (B) at once and appends the parameter-gradient work to ``bucket`` instead of
running it; ``flush(bucket)`` runs it later (W) and accumulates into ``param.grad`` (or into
``param.main_grad``, the fp32 buffer of a tandem optimizer, when the parameter has one). That
covers tandem's linear layers (weight GEMMs and biases), ``layer_norm`` (weight and bias:
ATen's layer-norm backward run once for the input, once for the parameters), ``rms_norm`` and
``embedding`` (the scatter-add of rows), which tandem's GPT uses. Outside the context every
gradient is computed at once, as usual. Modules that do not use these (user modules) get
their parameters' gradients in B.

The switch is process-wide, not thread-local: autograd may run a backward on a device thread.
"""

import collections
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

__all__ = ["defer_weight_grads", "deferring", "flush", "pending_params", "Deferred", "weight_grad", "weight_grads", "linear",
           "add_bias", "layer_norm", "rms_norm", "embedding"]

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


class Deferred:
    """One deferred piece of parameter-gradient work: ``params`` are the parameters it
    accumulates into when called."""

    __slots__ = ("params", "fn")

    def __init__(self, params: tuple, fn: Callable[[], None]):
        self.params, self.fn = params, fn

    def __call__(self) -> None:
        self.fn()


def flush(bucket: list, after: Optional[Callable[[Deferred], None]] = None) -> None:
    """Run the deferred gradient work of ``bucket`` (W), in order, and empty it; ``after(d)``
    runs after each piece. Runs without autograd recording: the gradients are plain
    tensors, and nothing of B is kept alive."""
    with torch.no_grad():
        for d in bucket:
            d()
            if after is not None:
                after(d)
    bucket.clear()


def pending_params(buckets) -> collections.Counter:
    """id of each parameter that deferred work in ``buckets`` (lists) will still write ->
    how many pieces will."""
    return collections.Counter(id(p) for bucket in buckets for d in bucket for p in d.params)


def _accumulate(param: Tensor, grad: Tensor) -> None:
    main = getattr(param, "main_grad", None)
    if main is not None:  # a tandem optimizer's fp32 gradient buffer (mixed precision)
        main.add_(grad)
        return
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


def weight_grad(param: Tensor, compute: Callable[[], Tensor]) -> Optional[Tensor]:
    """The gradient of ``param`` for a custom Function's backward to return: ``compute()`` now,
    or None while deferring (then ``compute()`` runs at flush and accumulates into
    ``param.grad``). ``param`` must be a leaf (a Parameter)."""
    return weight_grads((param,), lambda: (compute(),))[0]


def weight_grads(params: tuple, compute: Callable[[], tuple]) -> tuple:
    """``weight_grad`` for parameters whose gradients one computation yields together:
    ``compute()`` returns one gradient per entry of ``params`` (None entries: not needed)."""
    live = [p for p in params if p is not None]
    if _bucket is None or not all(p.is_leaf for p in live):
        return compute()

    def run():
        for p, g in zip(params, compute()):
            if p is not None and g is not None:
                _accumulate(p, g)

    _bucket.append(Deferred(tuple(live), run))
    return (None,) * len(params)


class _Linear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.weight, ctx.bias = weight, bias
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
        grad_b = None
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            grad_b = weight_grad(ctx.bias, lambda: g.sum(0))  # (M, N) -> (N)
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear whose weight gradient can be deferred (see module docstring)."""
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)


class _AddBias(Function):
    @staticmethod
    def forward(ctx, y, bias):
        ctx.bias = bias
        return y + bias  # (.., N) + (N)

    @staticmethod
    def backward(ctx, grad):
        b = ctx.bias
        gb = weight_grad(b, lambda: grad.reshape(-1, grad.shape[-1]).sum(0).to(b.dtype))  # (M, N) -> (N)
        return grad, gb


def add_bias(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``y + bias`` over the last dim, whose bias gradient can be deferred."""
    if bias is None:
        return y
    if not torch.is_grad_enabled() or not bias.requires_grad:
        return y + bias
    return _AddBias.apply(y, bias)


class _LayerNorm(Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd)
        ctx.shape, ctx.weight, ctx.bias = normalized_shape, weight, bias
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd = ctx.saved_tensors
        w, b = ctx.weight, ctx.bias
        need_x = ctx.needs_input_grad[0]
        need_w = w is not None and ctx.needs_input_grad[2]
        need_b = b is not None and ctx.needs_input_grad[3]

        def backward(mask):
            return torch.ops.aten.native_layer_norm_backward(grad, x, ctx.shape, mean, rstd, w, b, mask)

        if not deferring() or not (need_w or need_b):  # one pass for everything
            gx, gw, gb = backward([need_x, need_w, need_b])
            return gx, None, gw, gb, None
        gx = backward([True, False, False])[0] if need_x else None
        gw, gb = weight_grads((w if need_w else None, b if need_b else None),
                              lambda: backward([False, need_w, need_b])[1:])
        return gx, None, gw, gb, None


def layer_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """F.layer_norm whose weight and bias gradients can be deferred (see module docstring)."""
    if not torch.is_grad_enabled():
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return _LayerNorm.apply(x, list(normalized_shape), weight, bias, eps)


class _RMSNorm(Function):
    """weight * (x / sqrt(mean(x^2) + eps)), the statistics in float32 (Zhang & Sennrich 2019)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (.., 1)
        xhat = (xf * rstd).to(x.dtype)  # (.., h)
        ctx.save_for_backward(x, rstd)
        ctx.weight = weight
        return weight * xhat

    @staticmethod
    def backward(ctx, grad):
        x, rstd = ctx.saved_tensors
        w = ctx.weight
        gx = gw = None
        if ctx.needs_input_grad[0]:
            # d/dx of (x * rstd): rstd * (g - xhat * mean(g * xhat)), with g = grad * w, in float32
            xhat = x.to(torch.float32) * rstd
            g = (grad * w).to(torch.float32)
            gx = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            def compute():  # sum over tokens of grad * xhat -> (h)
                xhat = (x.to(torch.float32) * rstd).to(x.dtype)
                return (grad * xhat).reshape(-1, grad.shape[-1]).sum(0).to(w.dtype)
            gw = weight_grad(w, compute)
        return gx, gw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm of the last dimension whose weight gradient can be deferred (see module docstring)."""
    if not torch.is_grad_enabled():
        xf = x.to(torch.float32)
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return _RMSNorm.apply(x, weight, eps)


class _Embedding(Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)  # ids (...) -> (..., h)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        w = ctx.weight
        # grad (..., h) scatter-added into the rows of ids -> (num_embeddings, h)
        gw = weight_grad(w, lambda: torch.ops.aten.embedding_dense_backward(grad, ids, w.shape[0], -1, False))
        return None, gw


def embedding(ids: Tensor, weight: Tensor) -> Tensor:
    """F.embedding whose weight gradient can be deferred (see module docstring)."""
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return F.embedding(ids, weight)
    return _Embedding.apply(ids, weight)
