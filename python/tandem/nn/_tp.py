"""What a TP module needs from the mesh, divisibility checks, and init-full-then-shard."""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from tandem.mesh import Mesh, get_mesh


class TPInfo:
    """tp size, this rank's tp index and the TP communicator (None when tp == 1)."""

    def __init__(self, mesh: Optional[Mesh]):
        mesh = mesh if mesh is not None else get_mesh()
        self.mesh = mesh if mesh is not None else Mesh.single()  # resolved once, at construction
        self.size = self.mesh.tp
        self.rank = self.mesh.tp_rank

    @property
    def comm(self):
        return None if self.size == 1 else self.mesh.tp_comm  # created on first use


def check_divisible(module: str, what: str, value: int, tp: int) -> int:
    if value % tp:
        lower = value - value % tp
        raise ValueError(
            f"{module}: {what}={value} is not divisible by the tensor-parallel degree tp={tp}; "
            f"use a {what} that is a multiple of {tp} (e.g. {lower + tp}"
            + (f" or {lower}" if lower else "") + f") or a tp that divides {value}")
    return value // tp


def linear_init_(weight: Tensor, bias: Optional[Tensor], fan_in: int) -> None:
    """nn.Linear.reset_parameters on full tensors (same RNG draws, same order)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def shard(full: Tensor, dim: int, tp: TPInfo) -> Tensor:
    """This rank's contiguous slice of ``full`` along ``dim``."""
    n = full.shape[dim] // tp.size
    return full.narrow(dim, tp.rank * n, n)


def new_param(shape, device, dtype, *, tp_dim: Optional[int] = None) -> nn.Parameter:
    """An uninitialised parameter; ``tp_dim``: the dimension along which it is this rank's
    shard of a weight split over tp (None: the same on every tp rank)."""
    p = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
    if tp_dim is not None:
        p.tp_shard_dim = tp_dim
    return p


def tp_shard_dim(param: Tensor) -> Optional[int]:
    """The dimension along which ``param`` is split over tp (None: replicated on the tp ranks,
    e.g. norms, row-parallel biases, replicated KV projections)."""
    return getattr(param, "tp_shard_dim", None)


def init_device(device) -> torch.device:
    """Full weights are initialised on CPU (same RNG stream as a CPU nn.Linear), unless meta."""
    return torch.device("meta") if device is not None and torch.device(device).type == "meta" else torch.device("cpu")


def reset_linear_(module: nn.Module) -> None:
    """Initialise a TP linear layer like nn.Linear on its full weight, then keep its shard."""
    dev = init_device(module.weight.device)
    w = torch.empty(module.out_features, module.in_features, device=dev)
    b = torch.empty(module.out_features, device=dev) if module.bias is not None else None
    linear_init_(w, b, module.in_features)
    module.load_full_state_dict({"weight": w, **({"bias": b} if b is not None else {})})
