"""ColumnParallelLinear and RowParallelLinear (Megatron-LM's tensor-parallel linear pair).

ColumnParallelLinear splits the weight [out, in] along out: rank r holds rows
[r*out/tp, (r+1)*out/tp). RowParallelLinear splits it along in: rank r holds columns
[r*in/tp, ...). A column layer followed by a row layer needs one all-reduce in forward
(in the row layer) and one in backward (in the column layer).

Both are initialised like nn.Linear on the full weight, then sharded: with the same seed,
their full weights equal nn.Linear's. ``full_state_dict()`` / ``load_full_state_dict()``
give and take nn.Linear's keys and shapes.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from tandem import ops
from tandem.mesh import Mesh
from tandem.nn import _collectives as C
from tandem.nn import wgrad as W
from tandem.nn._tp import TPInfo, check_divisible, new_param, reset_linear_, shard

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "FusedColumnParallelLinear"]

_ACTIVATIONS = {None: None, "gelu": "none", "gelu_tanh": "tanh"}  # -> approximate


class ColumnParallelLinear(nn.Module):
    """y = act(x @ W^T + b) with W split by rows (output features) over tp.

    Input: the full [..., in_features] (or, with sequence_parallel, the local sequence shard
    [b, s/tp, in_features], all-gathered here). Output: [..., out_features/tp], or the full
    [..., out_features] with gather_output=True. ``activation`` in {None, "gelu",
    "gelu_tanh"} runs tandem's fused linear+bias+GeLU on the shard.
    """

    _tp_leaf = True  # a TP leaf: full_state_dict() gathers its shards

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 gather_output: bool = False, activation: Optional[str] = None,
                 sequence_parallel: bool = False, mesh: Optional[Mesh] = None, device=None, dtype=None):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"ColumnParallelLinear: activation must be one of None, 'gelu', 'gelu_tanh', "
                             f"got {activation!r}")
        if gather_output and sequence_parallel:
            raise ValueError("ColumnParallelLinear: gather_output=True cannot be combined with "
                             "sequence_parallel=True (the row layer after it expects a sharded input)")
        self.tp = TPInfo(mesh)
        self.in_features, self.out_features = in_features, out_features
        self.local_out = check_divisible("ColumnParallelLinear", "out_features", out_features, self.tp.size)
        self.gather_output, self.activation, self.sequence_parallel = gather_output, activation, sequence_parallel
        self.weight = new_param((self.local_out, in_features), device, dtype, tp_dim=0)
        self.bias = new_param((self.local_out,), device, dtype, tp_dim=0) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_linear_(self)

    def forward(self, x: Tensor) -> Tensor:
        comm = self.tp.comm
        approximate = _ACTIVATIONS[self.activation]
        if comm is not None and approximate is None and not self.sequence_parallel:
            from tandem.comm import column_parallel_linear

            # (..., in) @ (in, out/tp) -> (..., out/tp); in backward the all-reduce of the input
            # gradient overlaps the weight-gradient GEMM
            y = column_parallel_linear(x, self.weight, self.bias, comm)
            return C.gather_from_tp(y, comm, dim=-1) if self.gather_output else y
        # (b, s/tp, in) -> all-gather over tp -> (b, s, in); or f: identity, all-reduce in backward
        x = C.gather_from_sp(x, comm, dim=1) if self.sequence_parallel else C.copy_to_tp(x, comm)
        if approximate is None:
            y = W.linear(x, self.weight, self.bias)  # (..., in) @ (in, out/tp) -> (..., out/tp)
        else:
            y = ops.linear_bias_gelu(x, self.weight, self.bias, approximate)  # same GEMM, fused GeLU
        return C.gather_from_tp(y, comm, dim=-1) if self.gather_output else y  # -> (..., out)

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict) -> None:
        self.weight.copy_(shard(sd["weight"], 0, self.tp))
        if self.bias is not None:
            self.bias.copy_(shard(sd["bias"], 0, self.tp))

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        comm = self.tp.comm
        if comm is None:
            return {k: v.detach().clone() for k, v in self.named_parameters()}
        return {k: C.all_gather(v.detach(), comm, 0) for k, v in self.named_parameters()}  # (out/tp, ..) -> (out, ..)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (local {self.local_out}), "
                f"tp={self.tp.size}, bias={self.bias is not None}, activation={self.activation}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = x @ W^T + b with W split by columns (input features) over tp.

    Input: [..., in_features/tp] (input_is_parallel=True, the output of a
    ColumnParallelLinear) or the full [..., in_features] (scattered here). Output: the full
    [..., out_features], all-reduced over tp; with ``overlap_chunks`` > 1 the tokens are cut
    into chunks and chunk i's GEMM overlaps chunk i-1's all-reduce. With sequence_parallel,
    the output is reduce-scattered along the sequence: [b, s/tp, out_features].
    """

    _tp_leaf = True  # a TP leaf: full_state_dict() gathers its shards

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 input_is_parallel: bool = True, overlap_chunks: int = 1, sequence_parallel: bool = False,
                 mesh: Optional[Mesh] = None, device=None, dtype=None):
        super().__init__()
        if overlap_chunks < 1:
            raise ValueError(f"RowParallelLinear: overlap_chunks must be >= 1, got {overlap_chunks}")
        self.tp = TPInfo(mesh)
        self.in_features, self.out_features = in_features, out_features
        self.local_in = check_divisible("RowParallelLinear", "in_features", in_features, self.tp.size)
        self.input_is_parallel, self.overlap_chunks = input_is_parallel, overlap_chunks
        self.sequence_parallel = sequence_parallel
        self.weight = new_param((out_features, self.local_in), device, dtype, tp_dim=1)
        self.bias = new_param((out_features,), device, dtype) if bias else None  # replicated
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_linear_(self)

    def forward(self, x: Tensor) -> Tensor:
        comm = self.tp.comm
        if not self.input_is_parallel:
            x = C.scatter_to_tp(x, comm, dim=-1)  # (..., in) -> (..., in/tp)
        if comm is None:
            return W.linear(x, self.weight, self.bias)
        if self.sequence_parallel:
            y = W.linear(x, self.weight)  # (b, s, in/tp) @ (in/tp, out) -> (b, s, out), partial sums
            y = C.reduce_scatter_to_sp(y, comm, dim=1)  # -> (b, s/tp, out), summed over tp
            # each rank adds the bias to its own tokens: its gradient is summed over tp
            return y if self.bias is None else y + C.reduce_grad(self.bias, comm)
        from tandem.comm import row_parallel_linear

        # (..., in/tp) @ (in/tp, out) -> (..., out), all-reduced chunk by chunk, + bias
        return row_parallel_linear(x, self.weight, self.bias, comm, chunks=self.overlap_chunks)

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict) -> None:
        self.weight.copy_(shard(sd["weight"], 1, self.tp))
        if self.bias is not None:
            self.bias.copy_(sd["bias"])

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        comm = self.tp.comm
        w = self.weight.detach()
        sd = {"weight": w.clone() if comm is None else C.all_gather(w, comm, 1)}  # (out, in/tp) -> (out, in)
        if self.bias is not None:
            sd["bias"] = self.bias.detach().clone()
        return sd

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.local_in}), out_features={self.out_features}, "
                f"tp={self.tp.size}, bias={self.bias is not None}, overlap_chunks={self.overlap_chunks}, "
                f"sequence_parallel={self.sequence_parallel}")


def _shard_sections(full: Tensor, sections: int, tp: TPInfo) -> Tensor:
    """[out, ...] = [s_0; ...; s_{n-1}] -> this rank's [s_0 slice; ...; s_{n-1} slice], [out/tp, ...]."""
    per = full.shape[0] // sections
    local = per // tp.size
    parts = full.view(sections, per, *full.shape[1:]).narrow(1, tp.rank * local, local)  # (n, per/tp, ...)
    return parts.reshape(sections * local, *full.shape[1:])


def _unshard_sections(gathered: Tensor, sections: int, tp: int) -> Tensor:
    """The rank-ordered all-gather [tp * out/tp, ...] back to the section order [out, ...]."""
    rest = gathered.shape[1:]
    local = gathered.shape[0] // (tp * sections)
    g = gathered.view(tp, sections, local, *rest).transpose(0, 1)  # (n, tp, out/(n tp), ...)
    return g.reshape(gathered.shape[0], *rest)


class FusedColumnParallelLinear(ColumnParallelLinear):
    """A ColumnParallelLinear whose output is ``sections`` equal parts, each split over tp.

    For a fused [q; k; v] projection (sections=3) rank r computes [q_r; k_r; v_r]: the q, k and
    v columns of the same heads; for SwiGLU's [gate; up] (sections=2), the matching gate and up
    columns, so silu(gate) * up needs no communication. Output [..., out/tp] (never gathered:
    the sections interleave). Full weight [out, in] as nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sections: int,
                 mesh: Optional[Mesh] = None, device=None, dtype=None, **kwargs):
        tp = TPInfo(mesh).size
        if sections < 1 or out_features % (sections * tp):
            raise ValueError(f"{type(self).__name__}: out_features={out_features} is not {sections} equal sections "
                             f"each divisible by the tensor-parallel degree tp={tp}; use a multiple of {sections * tp}")
        self.sections = sections
        super().__init__(in_features, out_features, bias, mesh=mesh, device=device, dtype=dtype, **kwargs)

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict) -> None:
        self.weight.copy_(_shard_sections(sd["weight"], self.sections, self.tp))
        if self.bias is not None:
            self.bias.copy_(_shard_sections(sd["bias"], self.sections, self.tp))

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        sd = super().full_state_dict()  # (tp * out/tp, ...) in rank order
        return {k: _unshard_sections(v, self.sections, self.tp.size) for k, v in sd.items()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sections={self.sections}"
