"""ParallelMLP: fc1 column-parallel with fused GeLU (or SwiGLU's gate and up), fc2
row-parallel (one all-reduce)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from tandem import ops
from tandem.mesh import Mesh
from tandem.nn import _collectives as C
from tandem.nn import wgrad as W
from tandem.nn.wgrad import weight_grad
from tandem.nn.linear import ColumnParallelLinear, FusedColumnParallelLinear, RowParallelLinear
from tandem.nn.state import FullStateDictMixin

__all__ = ["ParallelMLP", "ACTIVATIONS"]

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")


class _MLPShard(Function):
    """fc2(gelu(fc1(x))) on this rank's shards, before fc2's all-reduce.

    Backward runs fc2's input-gradient GEMM together with fc1's GeLU backward and bias
    gradient (ops.linear_dgelu_bgrad: one cuBLASLt matmul with the DGELU_BGRAD epilogue on
    CUDA), so the gradient at fc1's output is never materialised.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, approximate):
        y1, pre = ops.linear_bias_gelu_fwd(x, w1, b1, approximate)  # (.., h) -> (.., ffn/tp), one GEMM
        y = F.linear(y1, w2)  # (.., ffn/tp) @ (ffn/tp, h) -> (.., h), partial sums over tp
        ctx.save_for_backward(x, w1, pre, y1, w2)
        ctx.approximate, ctx.has_bias, ctx.weights = approximate, b1 is not None, (w1, w2)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w1, pre, y1, w2 = ctx.saved_tensors
        grad = grad.contiguous()
        p1, p2 = ctx.weights
        g2, y2 = grad.reshape(-1, grad.shape[-1]), y1.reshape(-1, y1.shape[-1])
        grad_w2 = weight_grad(p2, lambda: g2.t() @ y2)  # (h, M) @ (M, ffn/tp), or deferred (W)
        # (.., h) @ (h, ffn/tp) * gelu'(pre) -> (.., ffn/tp), and its sum over tokens -> fc1's bias grad
        grad_pre, grad_b1 = ops.linear_dgelu_bgrad(grad, w2, pre, ctx.approximate)
        grad_x = grad_pre @ w1 if ctx.needs_input_grad[0] else None  # (.., ffn/tp) @ (ffn/tp, h), partial
        grad_w1 = weight_grad(p1, lambda: ops.linear_bias_gelu_backward_weight(grad_pre, x))  # (ffn/tp, M) @ (M, h)
        return grad_x, grad_w1, grad_b1 if ctx.has_bias else None, grad_w2, None


class ParallelMLP(FullStateDictMixin, nn.Module):
    """fc2(act(fc1(x))): [..., h] -> [..., ffn/tp] -> [..., h], all-reduced over tp.

    ``activation``: "gelu_tanh", "gelu" (erf) or "swiglu" (fc2(silu(gate(x)) * up(x)), Shazeer
    2020, with fc1 = [gate; up]). Full weights: fc1 [ffn, h] ([2*ffn, h] for swiglu), fc2
    [h, ffn] (nn.Linear keys "fc1.weight", ...).
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, activation: str = "gelu_tanh",
                 bias: bool = True, sequence_parallel: bool = False, overlap_chunks: int = 1,
                 mesh: Optional[Mesh] = None, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ParallelMLP: activation must be one of {ACTIVATIONS}, got {activation!r}")
        common = dict(mesh=mesh, device=device, dtype=dtype, sequence_parallel=sequence_parallel)
        self.activation = activation
        if activation == "swiglu":
            self.fc1 = FusedColumnParallelLinear(hidden_size, 2 * ffn_hidden_size, bias, sections=2, **common)
        else:
            self.fc1 = ColumnParallelLinear(hidden_size, ffn_hidden_size, bias, activation=activation, **common)
        self.fc2 = RowParallelLinear(ffn_hidden_size, hidden_size, bias, overlap_chunks=overlap_chunks, **common)

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if self.activation == "swiglu":
            gate, up = fc1(x).chunk(2, dim=-1)  # (.., h) -> (.., 2*ffn/tp) -> 2 x (.., ffn/tp)
            return fc2(F.silu(gate) * up)  # (.., ffn/tp) @ (ffn/tp, h) -> (.., h), all-reduced
        if fc1.sequence_parallel or fc2.overlap_chunks > 1:  # the layers' own collectives
            return fc2(fc1(x))  # (.., h) -> (.., ffn/tp) -> (.., h)
        comm = fc1.tp.comm
        x = C.copy_to_tp(x, comm)  # f: identity, all-reduce of the input gradient in backward
        approximate = "tanh" if fc1.activation == "gelu_tanh" else "none"
        y = _MLPShard.apply(x, fc1.weight, fc1.bias, fc2.weight, approximate)  # (.., h) partial
        y = C.reduce_from_tp(y, comm)  # g: all-reduce over tp
        return W.add_bias(y, fc2.bias)  # + (h), its gradient deferrable to W
