"""clip_grad_norm_: the global gradient norm over tp x pp x dp, each parameter counted once.

The norm is the one of the single-device model (``torch.nn.utils.clip_grad_norm_`` on its
twin). Each rank adds |g|^p of the gradients it is responsible for, and the sums meet over
the mesh (max for the inf-norm):

- a parameter split over tp (``tp_shard_dim``: column/row-parallel weights, vocabulary
  shards) counts on every tp rank: each holds a different part; a parameter replicated over
  tp (norms, row-parallel biases, replicated KV projections, sequence-parallel norms: their
  gradients are identical on the tp ranks) counts on tp rank 0 only;
- a pipeline stage's copy of a tied weight does not count (the source does, once);
- the stages' contributions are summed over pp;
- dp replicas hold the same averaged gradients, so dp is not summed over, except under the
  distributed optimizer, where each dp rank holds a different shard of the fp32 gradients.

Given a tandem optimizer (or parameters it manages), the fp32 master gradients are clipped,
after the dp reduction and the loss-scale division. An inf or nan norm is returned and no
gradient is changed (``error_if_nonfinite=True`` raises instead): the caller decides, e.g.
skips the step.
"""

from __future__ import annotations

import math
from typing import Iterable, Union

import torch
from torch import Tensor, nn

from tandem.nn._tp import tp_shard_dim
from tandem.optim._layout import is_tied_copy
from tandem.optim.mixed import MixedPrecisionOptimizer, mesh_all_reduce

__all__ = ["clip_grad_norm_", "grad_norm"]


def _params(target) -> list:
    if isinstance(target, (nn.Module, Tensor)):
        target = [target]
    out, seen = [], set()
    for item in target:
        for p in (item.parameters() if isinstance(item, nn.Module) else [item]):
            if not isinstance(p, Tensor):
                raise TypeError(f"clip_grad_norm_: expected modules or parameters, got {type(p).__name__}")
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _owner(params: list):
    """The tandem optimizer managing ``params`` (None when none does)."""
    owners = {id(o()): o() for p in params if getattr(p, "_tandem_optimizer", None) is not None
              for o in [p._tandem_optimizer]}
    if not owners:
        return None
    if len(owners) > 1 or None in owners.values():
        raise ValueError("clip_grad_norm_: the parameters are managed by several tandem optimizers; "
                         "clip each optimizer on its own")
    opt = next(iter(owners.values()))
    if {id(p) for p in params} != {id(p) for p in opt.params}:
        raise ValueError(f"clip_grad_norm_: the {len(params)} parameters given are not exactly the "
                         f"{len(opt.params)} that their {type(opt).__name__} manages; pass the optimizer")
    return opt


def _counts(param: Tensor, tp_rank: int) -> bool:
    return not is_tied_copy(param) and (tp_rank == 0 or tp_shard_dim(param) is not None)


def grad_norm(target, *, mesh=None, norm_type: float = 2.0) -> Tensor:
    """The global gradient norm (fp32 scalar, the same on every rank) without clipping."""
    return _norm(*_grads(target, mesh), norm_type)


def _grads(target, mesh):
    from tandem.mesh import Mesh, get_mesh

    params = None if isinstance(target, MixedPrecisionOptimizer) else _params(target)  # once: may be a generator
    opt = target if params is None else _owner(params)
    if opt is not None:
        if mesh is not None and mesh is not opt.mesh:
            raise ValueError("clip_grad_norm_: mesh differs from the optimizer's mesh")
        opt.prepare_grads()
        mesh = opt.mesh
        pairs = opt.master_grads()
        return opt, pairs, mesh, ("tp", "pp", "dp") if opt.sharded else ("tp", "pp")
    mesh = mesh if mesh is not None else (get_mesh() or Mesh.single())
    pairs = [(p, p.grad) for p in params if p.grad is not None]
    return None, pairs, mesh, ("tp", "pp")


def _norm(opt, pairs, mesh, dims, norm_type) -> Tensor:
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"clip_grad_norm_: norm_type must be > 0 (or inf), got {norm_type}")
    device = mesh.device
    counted = [g for p, g in pairs if _counts(p, mesh.tp_rank) and g.numel()]
    if norm_type == math.inf:
        local = torch.stack([g.detach().abs().max().float() for g in counted]).max() if counted \
            else torch.zeros((), device=device)
        total = mesh_all_reduce(local.reshape(1).to(device), mesh, "max", dims)  # (1,) max over the mesh
        return total.reshape(())
    if counted:
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type, dtype=torch.float32) for g in counted])
        local = (norms ** norm_type).sum()
    else:
        local = torch.zeros((), device=device)
    total = mesh_all_reduce(local.reshape(1).to(device).contiguous(), mesh, "sum", dims)  # (1,) summed over the mesh
    return total.reshape(()) ** (1.0 / norm_type)


def clip_grad_norm_(target: Union[MixedPrecisionOptimizer, nn.Module, Iterable], max_norm: float, *,
                    mesh=None, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)), the same factor on every
    rank, where norm is the global norm over tp x pp x dp (see the module docstring).

    ``target``: modules, parameters, or a tandem optimizer (then its fp32 master gradients
    are clipped). ``mesh``: default the default mesh (ignored for an optimizer: its own).
    Returns the norm before clipping (fp32 scalar, equal on every rank). A non-finite norm is
    returned without touching any gradient, or raises with ``error_if_nonfinite``.
    """
    max_norm = float(max_norm)
    if not (max_norm > 0):
        raise ValueError(f"clip_grad_norm_: max_norm must be > 0, got {max_norm}")
    opt, pairs, mesh, dims = _grads(target, mesh)
    if opt is not None and opt._found_inf:  # fp16 overflow: the step is skipped anyway
        return torch.tensor(math.inf, device=mesh.device)
    total = _norm(opt, pairs, mesh, dims, norm_type)
    if not torch.isfinite(total):
        if error_if_nonfinite:
            raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is "
                               f"{total.item()}; no gradient was changed")
        return total
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        if opt is not None:
            for b in opt.layout.buckets:
                b.grad_shard.mul_(coef.to(b.grad_shard.device))
        else:
            for _, g in pairs:
                g.mul_(coef.to(g.device, g.dtype))
    return total
