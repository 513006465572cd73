"""Load a Hugging Face checkpoint into tandem's GPT, each rank reading only its own slices.

The model is built on the meta device (no memory, no initialisation), then every parameter
this rank holds is materialised and filled from the safetensors file(s) with
``safe_open(...).get_slice``: a column-parallel shard reads its rows, a row-parallel shard
its columns, and replicated parameters (norms, positions, replicated k/v projections) are
read whole. With pipeline parallelism only this rank's stage is materialised: the layers of
the other stages stay on the meta device and are never read.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from tandem.hf.config import read_config, to_gpt_config
from tandem.hf.names import sources

__all__ = ["load_model", "Checkpoint"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Checkpoint:
    """The safetensors tensors of a checkpoint directory (one file or an index of shards),
    read by slices; counts the bytes it hands out (``bytes_read``) against the checkpoint's
    total (``bytes_total``)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(single):
            weight_map = None
        else:
            raise FileNotFoundError(f"tandem.hf: no model.safetensors or model.safetensors.index.json in '{path}'")
        self.path, self._files = path, {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.where, self.bytes_total, self.bytes_read = {}, 0, 0
        for name in files:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise FileNotFoundError(f"tandem.hf: '{file}' (listed in the index) is missing")
            try:
                handle = safe_open(file, framework="pt")
            except Exception as e:  # a truncated or corrupt file
                raise ValueError(f"tandem.hf: cannot read '{file}': {e}") from None
            self._files[name] = handle
            for key in handle.keys():
                self.where[key] = name
                sl = handle.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                self.bytes_total += n * torch.empty((), dtype=_DTYPES.get(sl.get_dtype(), torch.float32)).element_size()

    def shape(self, name: str) -> tuple:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in _DTYPES:
            raise ValueError(f"tandem.hf: tensor {name} has dtype {code}; supported: {sorted(_DTYPES)}")
        return _DTYPES[code]

    def read(self, name: str, ranges: list) -> torch.Tensor:
        """The part [start, start + n) of each dimension of tensor ``name``."""
        t = self._slice(name)[tuple(slice(a, a + n) for a, n in ranges)]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def _slice(self, name: str):
        if name not in self.where:
            raise KeyError(f"tandem.hf: tensor {name} is missing from the checkpoint '{self.path}'")
        return self._files[self.where[name]].get_slice(name)


def _shards(model: nn.Module) -> dict:
    """{local parameter name: (shard dim, tp rank, tp size)} for sharded parameters."""
    from tandem.nn.embedding import VocabParallelEmbedding
    from tandem.nn.linear import ColumnParallelLinear, RowParallelLinear

    out = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        tp = getattr(m, "tp", None)
        if tp is None or getattr(tp, "size", 1) == 1:
            continue
        if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)):
            for p in ("weight", "bias"):
                if getattr(m, p, None) is not None:
                    out[prefix + p] = (0, tp.rank, tp.size)
        elif isinstance(m, RowParallelLinear):
            out[prefix + "weight"] = (1, tp.rank, tp.size)
    return out


def _read_param(ckpt: Checkpoint, key: str, srcs: list, full_shape: tuple, shard, dtype) -> torch.Tensor:
    """This rank's part of tandem parameter ``key`` (full shape ``full_shape``), made of the
    sources concatenated along dim 0, each sharded alike."""
    part = (full_shape[0] // len(srcs), *full_shape[1:])  # each source's share, tandem orientation
    pieces = []
    for src in srcs:
        stored = ckpt.shape(src.name)
        mine = tuple(reversed(stored)) if src.transpose else stored  # tandem orientation
        i, n = src.section
        if mine[0] % n or (mine[0] // n, *mine[1:]) != part:
            got = f"{stored}" + (f" (section {i + 1} of {n})" if n > 1 else "")
            raise ValueError(f"tandem.hf: tensor {src.name} has shape {got}, tandem's {key} needs "
                             f"{tuple(reversed(part)) if src.transpose else part}")
        ranges = [(i * part[0], part[0])] + [(0, d) for d in part[1:]]
        if shard is not None:
            dim, rank, size = shard
            start, length = ranges[dim]
            ranges[dim] = (start + rank * (length // size), length // size)
        if src.transpose:
            pieces.append(ckpt.read(src.name, ranges[::-1]).t())
        else:
            pieces.append(ckpt.read(src.name, ranges))
    return torch.cat(pieces, 0).to(dtype) if len(pieces) > 1 else pieces[0].to(dtype)


def load_model(path: str, mesh=None, *, dtype: Optional[torch.dtype] = None, device=None,
               balance="params", whole: bool = False):
    """tandem's GPT with this rank's shards of the Hugging Face checkpoint in ``path``.

    ``path``: a directory with ``config.json`` and ``model.safetensors`` (or shards listed in
    ``model.safetensors.index.json``) of a LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM or GPT2LMHeadModel. ``mesh``: the layout (default: the default mesh, else
    one device). ``dtype``: of the parameters (default: the checkpoint's). ``device``:
    default the mesh's.

    With ``mesh.pp > 1`` the layers are partitioned with ``tandem.pipeline.partition(
    model.layers(), pp, balance=balance)`` and only this rank's stage is materialised and
    read; the returned model's ``partition`` is that cut. Build the stage with
    ``tandem.pipeline.split(model.layers(), mesh.pp, balance=model.partition)``. The other
    layers stay on the meta device (calling the whole model there is an error). The head's
    stage also reads the token embedding when the embeddings are tied (its copy of the weight).

    ``whole=True`` materialises every layer whatever pp (e.g. for an interleaved schedule, which
    cuts the layers into more stages than pp; ``partition`` is then None).

    ``model.load_report``: {"bytes_read", "bytes_total"} of this rank.
    Every size is checked against ``mesh.tp`` before any weight is read.
    """
    from tandem.mesh import Mesh, get_mesh
    from tandem.models.gpt import GPT

    mesh = mesh if mesh is not None else (get_mesh() or Mesh.single())
    arch, cfg = to_gpt_config(read_config(path))
    cfg.check_tp(mesh.tp)  # before any weight is read
    ckpt = Checkpoint(path)
    table = sources(arch, cfg, ckpt.where.keys())
    first = next(iter(table.values()))[0].name
    dtype = dtype or ckpt.dtype(first)
    device = torch.device(device) if device is not None else mesh.device
    model = GPT(cfg, mesh=mesh, device="meta", dtype=dtype)
    model.architecture = arch
    keep = _stage_layers(model, 1 if whole else mesh.pp, mesh.pp_rank, balance)
    shards = _shards(model)
    for layer in keep:
        layer.to_empty(device=device)  # new parameter objects: named after this
    names = {id(p): name for name, p in model.named_parameters()}
    for layer in keep:
        for p in layer.parameters():
            full_name = names[id(p)]
            if full_name not in table:
                raise KeyError(f"tandem.hf: tandem's {full_name} has no tensor in a {arch} checkpoint")
            shard = shards.get(full_name)
            full_shape = list(p.shape)
            if shard is not None:
                full_shape[shard[0]] *= shard[2]
            with torch.no_grad():
                p.copy_(_read_param(ckpt, full_name, table[full_name], tuple(full_shape), shard, dtype))
    model.load_report = {"bytes_read": ckpt.bytes_read, "bytes_total": ckpt.bytes_total}
    return model


def _stage_layers(model, pp: int, pp_rank: int, balance) -> list:
    """The layers this rank materialises: all of them at pp=1, else its stage's (plus the
    token embedding on the head's stage when tied)."""
    layers = model.layers()
    model.partition = None
    if pp == 1:
        return layers
    from tandem.pipeline import partition

    cut = partition(layers, pp, balance=balance)
    model.partition = cut
    first, end = cut.bounds[pp_rank]
    keep = layers[first:end]
    if model.config.tie_embeddings and end == len(layers) and first > 0:
        keep.append(model.embed.tok)  # split() copies the tied weight from it
    return keep
