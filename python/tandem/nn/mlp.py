"""ParallelMLP: fc1 column-parallel with fused GeLU, fc2 row-parallel (one all-reduce)."""

from typing import Optional

from torch import Tensor, nn

from tandem.mesh import Mesh
from tandem.nn.linear import ColumnParallelLinear, RowParallelLinear
from tandem.nn.state import FullStateDictMixin

__all__ = ["ParallelMLP"]


class ParallelMLP(FullStateDictMixin, nn.Module):
    """fc2(gelu(fc1(x))): [..., h] -> [..., ffn/tp] -> [..., h], all-reduced over tp.

    Full weights: fc1 [ffn, h], fc2 [h, ffn] (nn.Linear keys "fc1.weight", ...).
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, activation: str = "gelu_tanh",
                 bias: bool = True, sequence_parallel: bool = False, overlap_chunks: int = 1,
                 mesh: Optional[Mesh] = None, device=None, dtype=None):
        super().__init__()
        if activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"ParallelMLP: activation must be 'gelu' or 'gelu_tanh', got {activation!r}")
        common = dict(mesh=mesh, device=device, dtype=dtype, sequence_parallel=sequence_parallel)
        self.fc1 = ColumnParallelLinear(hidden_size, ffn_hidden_size, bias, activation=activation, **common)
        self.fc2 = RowParallelLinear(ffn_hidden_size, hidden_size, bias, overlap_chunks=overlap_chunks, **common)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x))  # (.., h) -> (.., ffn/tp) -> (.., h)
