"""A tandem optimizer's state in torch.distributed.checkpoint (DCP), resharded on load.

Each rank owns pieces of flattened parameters (its dp shard of every bucket, see _layout).
A piece of a parameter of local shape (R, C) is a run of rows: up to three rectangles (a
partial first row, full rows, a partial last row). Every per-element state (the fp32
master, AdamW's moments, ...) is saved under the parameter's name with the full (tp-gathered)
shape, each rectangle at its global offset (shifted by the tp rank's offset along the
parameter's shard dimension). DCP then reads whatever rectangles another layout owns: a
checkpoint written at one dp (and tp) degree loads at another. Replicated parameters are
written by every tp rank with the same offsets (DCP keeps one), a tied copy not at all (its
source is written; the copy loads the source's state). Scalar state (AdamW's ``step``) is
saved per parameter as a plain tensor, the param groups' settings and the loss scaler as
one object.

Keys: ``optim.master.NAME``, ``optim.state.NAME.KEY``, ``optim.scalar.NAME.KEY``, ``optim.meta``.
"""

from __future__ import annotations

import pickle

import torch
from torch import Tensor

__all__ = ["optimizer_state_dict", "load_optimizer_state"]


def _rectangles(start: int, end: int, shape) -> list[tuple[tuple, int, int, tuple]]:
    """[(offset in the parameter, first and end element in the flat piece, rectangle shape)]
    covering the flat range [start, end) of a parameter of ``shape`` (1-D or 2-D)."""
    if len(shape) == 1:
        return [((start,), 0, end - start, (end - start,))]
    cols = shape[1]
    r0, c0 = divmod(start, cols)
    r1, c1 = divmod(end, cols)
    if r0 == r1:
        return [((r0, c0), 0, end - start, (1, end - start))]
    out, at = [], 0
    if c0:  # the partial first row
        out.append(((r0, c0), 0, cols - c0, (1, cols - c0)))
        at, r0 = cols - c0, r0 + 1
    if r1 > r0:  # full rows
        out.append(((r0, 0), at, at + (r1 - r0) * cols, (r1 - r0, cols)))
        at += (r1 - r0) * cols
    if c1:  # the partial last row
        out.append(((r1, 0), at, at + c1, (1, c1)))
    return out


class _Chunks(torch.Tensor):
    """A state of the parameter's full shape of which this rank holds some rectangles
    (views of its own tensors): what DCP writes from and reads into."""

    @staticmethod
    def __new__(cls, shape, chunks: list, dtype, device):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        t._chunks = chunks  # [(global offset, tensor)]
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"tandem.optim: {func} on a checkpoint view of sharded optimizer state")

    def __create_chunk_list__(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=t.shape) for o, t in self._chunks]

    def __create_write_items__(self, fqn: str, obj):
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets, i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(t),
                                                      size=self.shape))
                for i, (chunk, (_, t)) in enumerate(zip(self.__create_chunk_list__(), self._chunks))]

    def __get_tensor_shard__(self, index):
        for o, t in self._chunks:
            if torch.Size(o) == index.offset:
                return t
        raise ValueError(f"tandem.optim: no chunk of {index.fqn} at offset {tuple(index.offset)} on this rank")


def _view(pieces_and_tensors, param, mesh) -> _Chunks:
    """The _Chunks of one state of ``param``: ``pieces_and_tensors`` = [(piece, its flat tensor)]."""
    shape = list(param.shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"tandem.optim: checkpoints of sharded optimizer state support 1-D and 2-D "
                         f"parameters, got shape {tuple(shape)}")
    dim = getattr(param, "tp_shard_dim", None)
    shift = [0] * len(shape)
    full = list(shape)
    if dim is not None and mesh.tp > 1:
        shift[dim] = mesh.tp_rank * shape[dim]
        full[dim] *= mesh.tp
    chunks = []
    for pc, flat in pieces_and_tensors:
        for offset, a, b, rect in _rectangles(pc.start, pc.end, shape):
            chunks.append((tuple(o + s for o, s in zip(offset, shift)), flat[a:b].view(rect)))
    ref = pieces_and_tensors[0][1]
    return _Chunks(torch.Size(full), chunks, ref.dtype, ref.device)


def _source_name(param, names: dict) -> str:
    source = getattr(param, "_tandem_tied_source", None)
    name = names.get(id(param)) if source is None else names.get(id(source[0]))
    if name is None:
        raise ValueError(f"tandem.optim: a parameter of shape {tuple(param.shape)} managed by the optimizer has no "
                         "name in the model given to the checkpoint")
    return name


def _by_param(opt) -> dict:
    out: dict = {}
    for pc in opt.layout.pieces:
        out.setdefault(id(pc.param), (pc.param, []))[1].append(pc)
    return out


def optimizer_state_dict(opt, names: dict) -> dict:
    """DCP entries for ``opt`` (a MixedPrecisionOptimizer); ``names``: id(param) -> name."""
    from tandem.optim._layout import is_tied_copy

    sd = {}
    for param, pieces in _by_param(opt).values():
        if is_tied_copy(param):
            continue  # its source's state is the same and is written
        name = _source_name(param, names)
        sd[f"optim.master.{name}"] = _view([(pc, pc.master) for pc in pieces], param, opt.mesh)
        states = [opt.inner.state.get(pc.master, {}) for pc in pieces]
        for key in states[0]:
            values = [st[key] for st in states]
            if values[0] is None:  # e.g. SGD's momentum buffer before its first use
                continue
            if isinstance(values[0], Tensor) and values[0].dim() == 1 and values[0].numel() == pieces[0].numel:
                sd[f"optim.state.{name}.{key}"] = _view(list(zip(pieces, values)), param, opt.mesh)
            else:
                sd[f"optim.scalar.{name}.{key}"] = values[0].detach().clone() if isinstance(values[0], Tensor) \
                    else torch.tensor(values[0])
    meta = {"groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.inner.param_groups],
            "scaler": opt.scaler.state_dict() if opt.scaler is not None else None}
    sd["optim.meta"] = pickle.dumps(meta)
    return sd


def load_optimizer_state(opt, names: dict, reader) -> dict:
    """Fill ``opt`` from a checkpoint (``reader``: a DCP storage reader); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = reader.read_metadata().state_dict_metadata
    if "optim.meta" not in saved:
        raise ValueError("tandem.optim: the checkpoint holds no optimizer state (saved without optimizer=)")
    sd, fill = {}, []
    for param, pieces in _by_param(opt).values():
        name = _source_name(param, names)
        key = f"optim.master.{name}"
        if key not in saved:
            raise KeyError(f"tandem.optim: the checkpoint holds no optimizer state for parameter {name}")
        sd[key] = _view([(pc, pc.master) for pc in pieces], param, opt.mesh)
        state = [dict() for _ in pieces]
        for fqn, md in saved.items():
            for kind in ("state", "scalar"):
                prefix = f"optim.{kind}.{name}."
                if not fqn.startswith(prefix) or "." in fqn[len(prefix):]:
                    continue
                k = fqn[len(prefix):]
                if kind == "state":
                    dtype = md.properties.dtype
                    flats = [torch.zeros(pc.numel, dtype=dtype, device=pc.master.device) for pc in pieces]
                    sd[fqn] = _view(list(zip(pieces, flats)), param, opt.mesh)
                    for st, t in zip(state, flats):
                        st[k] = t
                else:
                    assert isinstance(md, TensorStorageMetadata)
                    t = torch.zeros(md.size, dtype=md.properties.dtype)
                    sd[fqn] = t
                    fill.append((state, k, t))
        for pc, st in zip(pieces, state):
            opt.inner.state[pc.master] = st
    sd["optim.meta"] = b""
    dcp.load(sd, storage_reader=reader)
    for state, k, t in fill:  # scalars: one tensor per piece, as the optimizer keeps them
        for st in state:
            st[k] = t.clone()
    loaded = pickle.loads(sd["optim.meta"])
    for group, saved_group in zip(opt.inner.param_groups, loaded["groups"]):
        group.update(saved_group)
    if opt.scaler is not None and loaded["scaler"] is not None:
        opt.scaler.load_state_dict(loaded["scaler"])
    return loaded
