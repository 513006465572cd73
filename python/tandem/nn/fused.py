"""FusedLinearGELU: nn.Sequential(nn.Linear, nn.GELU) as one fused op."""

import math

import torch
from torch import Tensor, nn

from tandem import ops

__all__ = ["FusedLinearGELU"]


class FusedLinearGELU(nn.Module):
    """``gelu(x @ weight.T + bias)`` in one op: a drop-in for
    ``nn.Sequential(nn.Linear(in_features, out_features, bias), nn.GELU(approximate))``.

    Parameters have nn.Linear's names, shapes and initialisation (``weight`` is
    [out_features, in_features], ``bias`` [out_features]), so state dicts load both ways
    (an nn.Sequential's keys carry a "0." prefix).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, approximate: str = "tanh",
                 device=None, dtype=None):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f'approximate must be "tanh" or "none" (as torch.nn.GELU), got "{approximate}"')
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.approximate = approximate
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's scheme, so a seeded FusedLinearGELU equals a seeded nn.Linear.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear_bias_gelu(x, self.weight, self.bias, self.approximate)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, approximate={self.approximate!r}")
