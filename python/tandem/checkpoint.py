"""Checkpoints that move between TP sizes (and, for a tandem optimizer's state, between dp
sizes), on torch.distributed.checkpoint (DCP).

Every sharded parameter is saved as a DTensor over its TP group, so the checkpoint holds
global shapes and each shard's offset; a model at another TP degree (or a plain
single-device model) loads the same full weights, resharded on read. Replicated
parameters are written once. Saves are atomic: files go to ``PATH.partial`` and the
directory is renamed to ``PATH`` only after every rank has finished writing.

With ``optimizer=`` (a tandem.optim MixedPrecisionOptimizer or DistributedOptimizer), its
fp32 masters and states are written too, each rank its own shard (tandem.optim._dcp), and
read back at any dp and tp degree.
"""

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

__all__ = ["save", "load", "read_extra"]

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


def _state_dict(model: nn.Module, params=None) -> dict:
    """The model's parameters (only those in ``params`` when given), sharded ones wrapped as
    DTensors with their global shape."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    sharded, sections = _placements(model), _sections(model)
    meshes = {}
    sd = {}
    keep = None if params is None else {id(p) for p in params}
    for name, p in model.named_parameters():
        if keep is not None and id(p) not in keep:
            continue
        data, n = p.data, sections.get(name)
        if n is not None:  # (n * out/n/tp, ...) viewed as (n, out/n/tp, ...): a view, loads in place
            data = data.view(n, -1, *data.shape[1:])
        if name not in sharded:
            sd[name] = data
            continue
        dim, tp = sharded[name]
        dim += n is not None  # the sections' dimension comes first
        key = id(tp.mesh)
        if key not in meshes:
            meshes[key] = DeviceMesh.from_group(tp.mesh.tp_group, p.device.type)
        shape = list(data.shape)
        shape[dim] *= tp.size
        sd[name] = DTensor.from_local(data, meshes[key], [Shard(dim)], run_check=False,
                                      shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())
    return sd


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _names(model: nn.Module) -> dict:
    return {id(p): n for n, p in model.named_parameters()}


def save(model: nn.Module, path: str, *, params=None, extra: Optional[dict] = None, optimizer=None) -> None:
    """Write ``model`` to the directory ``path``; collective over every rank.

    ``params``: the parameters this rank owns (e.g. its pipeline stage's), written under
    their names in ``model``; default all. ``extra`` (JSON-serialisable) is stored beside
    the weights, e.g. the model config. ``optimizer``: a tandem optimizer over parameters
    of ``model`` whose state is written too (its shard on each rank).
    """
    path = os.path.abspath(path)
    partial = path + ".partial"
    if _rank0():
        shutil.rmtree(partial, ignore_errors=True)  # the leftovers of an interrupted save
        os.makedirs(partial)
    _barrier()
    if optimizer is not None:  # parameters whose all-gather is still pending: written when it lands
        optimizer.finish_param_gather()
    sd = _state_dict(model, params)
    if optimizer is not None:
        sd.update(optimizer.sharded_state_dict(_names(model)))
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(partial))
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


def _check_complete(path: str) -> None:
    if not os.path.isdir(path):
        hint = " (an interrupted save left PATH.partial)" if os.path.isdir(path + ".partial") else ""
        raise FileNotFoundError(f"tandem.checkpoint: no checkpoint at '{path}'{hint}")
    if not os.path.exists(os.path.join(path, _META)) or not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"tandem.checkpoint: '{path}' is not a complete tandem checkpoint")


def load(model: nn.Module, path: str, *, params=None, optimizer=None) -> None:
    """Load the checkpoint at ``path`` into ``model`` in place, whatever TP degree wrote it.

    Collective over every rank. ``params``: only these parameters of ``model`` (e.g. this
    rank's stage's); default all. ``optimizer``: also load a tandem optimizer's state
    (written with ``save(..., optimizer=)`` at any dp and tp degree); the parameters are then
    set from its fp32 masters. Raises FileNotFoundError (before any communication) when
    ``path`` holds no complete checkpoint, and an error naming the keys when they differ.
    """
    path = os.path.abspath(path)
    _check_complete(path)
    sd = _state_dict(model, params)
    dcp.load(sd, storage_reader=dcp.FileSystemReader(path))
    if optimizer is not None:
        optimizer.load_sharded_state_dict(_names(model), dcp.FileSystemReader(path))
