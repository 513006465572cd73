"""Checkpoints that move between TP sizes (and, for a tandem optimizer's state, between dp
sizes), on torch.distributed.checkpoint (DCP).

Every sharded parameter is saved as a DTensor over its TP group, so the checkpoint holds
global shapes and each shard's offset; a model at another TP degree (or a plain
single-device model) loads the same full weights, resharded on read. Replicated
parameters are written once. Saves are atomic: files go to ``PATH.partial`` and the
directory is renamed to ``PATH`` only after every rank has finished writing.

A training checkpoint also holds the optimizer's state (``optimizer=``): with a tandem.optim
MixedPrecisionOptimizer or DistributedOptimizer its fp32 masters and states, each rank its
own shard (tandem.optim._dcp), read back at any dp and tp degree; with torch's Adam/AdamW
every state tensor of a parameter's shape (the moments) sharded like the parameter, under
``optimizer.<param name>.<key>``, so it too loads at another TP or PP layout. ``state=``:
any other tensors (e.g. each rank's RNG states under keys of its own).
"""

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

__all__ = ["save", "load", "read_extra", "is_complete"]

_META = "tandem.json"


def _sections(module: nn.Module) -> dict:
    """{param name: n} for parameters made of n equal sections along dim 0, each split over tp
    (FusedColumnParallelLinear: [q; k; v], SwiGLU's [gate; up]): saved as [n, out/n, ...] at
    every tp, so that a checkpoint moves between tp sizes section by section."""
    from tandem.nn.linear import FusedColumnParallelLinear

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, FusedColumnParallelLinear) and m.sections > 1:
            prefix = f"{name}." if name else ""
            for p in ("weight", "bias"):
                if getattr(m, p, None) is not None:
                    out[prefix + p] = m.sections
    return out


def _placements(module: nn.Module) -> dict:
    """{param name: shard dim} for the sharded parameters of TP leaves (others are replicated)."""
    from tandem.nn.embedding import VocabParallelEmbedding
    from tandem.nn.linear import ColumnParallelLinear, RowParallelLinear

    out = {}
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        if getattr(m, "tp", None) is None or getattr(m.tp, "size", 1) == 1:
            continue
        if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)):
            out[f"{prefix}weight"] = (0, m.tp)
            if getattr(m, "bias", None) is not None:
                out[f"{prefix}bias"] = (0, m.tp)
        elif isinstance(m, RowParallelLinear):
            out[f"{prefix}weight"] = (1, m.tp)
    return out


def _param_names(model: nn.Module, params=None) -> dict:
    """{id(param): name in ``model``} of ``params`` (default: all of the model's).

    A parameter of ``params`` that ``model`` does not hold is named after the parameter it
    copies: a pipeline stage's copy of a tied weight (``split``'s ``tied_copies``) is
    ``model``'s tied weight (found through the GPT head's ``tied_source()``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    if params is None:
        return names
    out = {}
    head = getattr(model, "head", None)
    source = head.tied_source() if head is not None and hasattr(head, "tied_source") else None
    for p in params:
        if id(p) in names:
            out[id(p)] = names[id(p)]
        elif source is not None and p.shape == source.weight.shape:
            out[id(p)] = names[id(source.weight)]
        else:
            raise ValueError(f"tandem.checkpoint: a parameter of shape {tuple(p.shape)} is not one of the model's")
    return out


class _Sharder:
    """Wraps tensors shaped like a sharded parameter as DTensors with the global shape."""

    def __init__(self, model: nn.Module):
        self.placements, self.sections = _placements(model), _sections(model)
        self.meshes: dict = {}

    def __call__(self, name: str, t: torch.Tensor, like: torch.Tensor):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        if t.shape != like.shape:
            return t
        n = self.sections.get(name)
        if n is not None:  # (n * out/n/tp, ...) viewed as (n, out/n/tp, ...): a view, loads in place
            t = t.view(n, -1, *t.shape[1:])
        if name not in self.placements:
            return t
        dim, tp = self.placements[name]
        dim += n is not None  # the sections' dimension comes first
        key = id(tp.mesh)
        if key not in self.meshes:
            self.meshes[key] = DeviceMesh.from_group(tp.mesh.tp_group, t.device.type)
        shape = list(t.shape)
        shape[dim] *= tp.size
        return DTensor.from_local(t, self.meshes[key], [Shard(dim)], run_check=False,
                                  shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())


def _state_dict(model: nn.Module, params=None) -> dict:
    """The model's parameters (only those in ``params`` when given, a stage's copy of a tied
    weight under the tied weight's name), sharded ones wrapped as DTensors with their global
    shape."""
    wrap = _Sharder(model)
    if params is None:
        items = list(model.named_parameters())
    else:
        names = _param_names(model, params)
        items = [(names[id(p)], p) for p in params]
    sd = {}
    for name, p in items:
        sd.setdefault(name, wrap(name, p.data, p))
    return sd


def _optimizer_state_dict(model: nn.Module, optimizer) -> dict:
    """``optimizer.<param name>.<key>``: the optimizer's state of every parameter it steps
    (created first, zero, when it has not stepped yet), sharded like the parameter."""
    init_optimizer_state(optimizer)
    names = _param_names(model, [p for g in optimizer.param_groups for p in g["params"]])
    wrap = _Sharder(model)
    sd = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value):
                    sd[f"optimizer.{name}.{key}"] = wrap(name, value, p)
    return sd


def init_optimizer_state(optimizer) -> None:
    """Create the state an Adam/AdamW optimizer makes on its first step (zeros), for every
    parameter that has none yet, so a checkpoint can be loaded into it in place."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"tandem.checkpoint: saving the state of {type(optimizer).__name__} is not supported "
                        "(Adam and AdamW are)")
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # torch's choice
    for group in optimizer.param_groups:
        for p in group["params"]:
            if optimizer.state[p]:
                continue
            state = {"step": torch.zeros((), dtype=scalar),
                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            optimizer.state[p].update(state)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _names(model: nn.Module) -> dict:
    return {id(p): n for n, p in model.named_parameters()}


def _tandem_optimizer(optimizer) -> bool:
    return hasattr(optimizer, "sharded_state_dict")


def save(model: nn.Module, path: str, *, params=None, extra: Optional[dict] = None, optimizer=None,
         state: Optional[dict] = None, before_commit=None) -> None:
    """Write ``model`` to the directory ``path``; collective over every rank.

    ``params``: the parameters this rank owns (e.g. its pipeline stage's), written under
    their names in ``model``; default all. ``extra`` (JSON-serialisable) is stored beside
    the weights, e.g. the model config. ``optimizer``: a tandem optimizer, or torch's
    Adam/AdamW, over parameters of ``model`` whose state is written too (a tandem
    optimizer's shard on each rank). ``state``: more tensors, by key. ``before_commit()``:
    called on every rank once its part is written, before the checkpoint is complete (a
    rank that dies in it leaves only ``PATH.partial``).
    """
    path = os.path.abspath(path)
    partial = path + ".partial"
    if _rank0():
        shutil.rmtree(partial, ignore_errors=True)  # the leftovers of an interrupted save
        os.makedirs(partial)
    _barrier()
    if optimizer is not None and _tandem_optimizer(optimizer):
        optimizer.finish_param_gather()  # parameters whose all-gather is still pending: written when it lands
    sd = _state_dict(model, params)
    if optimizer is not None:
        sd.update(optimizer.sharded_state_dict(_names(model)) if _tandem_optimizer(optimizer)
                  else _optimizer_state_dict(model, optimizer))
    sd.update(state or {})
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(partial))
    if before_commit is not None:
        before_commit()
    _barrier()
    if _rank0():
        with open(os.path.join(partial, _META), "w") as f:
            json.dump({"format": 1, "extra": extra or {}}, f)
        old = path + ".old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(partial, path)  # atomic: PATH appears complete or not at all
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def read_extra(path: str) -> dict:
    """The ``extra`` dict stored by :func:`save` (e.g. the model config)."""
    _check_complete(path)
    with open(os.path.join(path, _META)) as f:
        return json.load(f)["extra"]


def is_complete(path: str) -> bool:
    """Whether ``path`` holds a complete checkpoint (what :func:`load` accepts)."""
    try:
        _check_complete(path)
    except FileNotFoundError:
        return False
    return True


def _check_complete(path: str) -> None:
    if not os.path.isdir(path):
        hint = " (an interrupted save left PATH.partial)" if os.path.isdir(path + ".partial") else ""
        raise FileNotFoundError(f"tandem.checkpoint: no checkpoint at '{path}'{hint}")
    if not os.path.exists(os.path.join(path, _META)) or not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"tandem.checkpoint: '{path}' is not a complete tandem checkpoint")


def load(model: nn.Module, path: str, *, params=None, optimizer=None, state: Optional[dict] = None) -> None:
    """Load the checkpoint at ``path`` into ``model`` in place, whatever TP degree wrote it.

    ``params``: load only these parameters of ``model`` (e.g. this rank's pipeline stage's);
    default all. ``optimizer``: also load its state (written with ``save(..., optimizer=)``
    at any layout; a tandem optimizer's at any dp and tp degree, the parameters then set
    from its fp32 masters). ``state``: more tensors, loaded in place by key.
    Collective over every rank. Raises FileNotFoundError (before any communication) when
    ``path`` holds no complete checkpoint, and an error naming the keys when they differ.
    """
    path = os.path.abspath(path)
    _check_complete(path)
    sd = _state_dict(model, params)
    if optimizer is not None and not _tandem_optimizer(optimizer):
        sd.update(_optimizer_state_dict(model, optimizer))
    sd.update(state or {})
    dcp.load(sd, storage_reader=dcp.FileSystemReader(path))
    if optimizer is not None and _tandem_optimizer(optimizer):
        optimizer.load_sharded_state_dict(_names(model), dcp.FileSystemReader(path))
