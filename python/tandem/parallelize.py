"""parallelize: turn a plain model into a tensor-parallel one, in place, by a plan.

A plan maps module-name patterns (fnmatch, matched against the full dotted name) to a style:

    "colwise"          nn.Linear -> ColumnParallelLinear (output stays sharded)
    "colwise_gather"   nn.Linear -> ColumnParallelLinear(gather_output=True) (full output)
    "rowwise"          nn.Linear -> RowParallelLinear (input is the sharded output of a colwise layer)
    "rowwise_scatter"  nn.Linear -> RowParallelLinear(input_is_parallel=False)
    "vocab"            nn.Embedding -> VocabParallelEmbedding

The full weights are copied into each rank's shard. Attention modules of a converted model
must derive their head count from the projection's output size (``view(b, s, -1, hd)``),
as GPT-2- and Llama-style code commonly does. tandem's own GPT has a built-in plan: it is
rebuilt at the mesh's TP degree from its full weights.
"""

import fnmatch
from typing import Optional

import torch
from torch import nn

from tandem.mesh import Mesh, get_mesh
from tandem.nn.embedding import VocabParallelEmbedding
from tandem.nn.linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["parallelize", "GPT2_PLAN", "LLAMA_PLAN", "STYLES"]

STYLES = ("colwise", "colwise_gather", "rowwise", "rowwise_scatter", "vocab")

GPT2_PLAN = {
    "transformer.wte": "vocab",
    "transformer.h.*.attn.[qkv]_proj": "colwise",
    "transformer.h.*.attn.c_proj": "rowwise",
    "transformer.h.*.mlp.c_fc": "colwise",
    "transformer.h.*.mlp.c_proj": "rowwise",
    "lm_head": "colwise_gather",
}
"""GPT-2-style names (separate q/k/v projections; a fused c_attn cannot be split by columns)."""

LLAMA_PLAN = {
    "model.embed_tokens": "vocab",
    "model.layers.*.self_attn.[qkv]_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise_gather",
}
"""Llama-style names (num_key_value_heads must be divisible by tp)."""


def _convert(name: str, module: nn.Module, style: str, mesh: Mesh) -> nn.Module:
    w = module.weight
    factory = dict(mesh=mesh, device="meta", dtype=w.dtype)
    if style == "vocab":
        new = VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, **factory)
        full = {"weight": w.detach()}
    else:
        bias = module.bias is not None
        if style.startswith("colwise"):
            new = ColumnParallelLinear(module.in_features, module.out_features, bias,
                                       gather_output=style == "colwise_gather", **factory)
        else:
            new = RowParallelLinear(module.in_features, module.out_features, bias,
                                    input_is_parallel=style == "rowwise", **factory)
        full = {"weight": w.detach(), **({"bias": module.bias.detach()} if bias else {})}
    new = new.to_empty(device=w.device)
    new.load_full_state_dict(full)
    new.train(module.training)
    return new


def _parallelize_gpt(model, mesh: Mesh):
    from tandem.models.gpt import GPT

    full = model.full_state_dict()
    p = next(model.parameters())
    new = GPT(model.config, mesh=mesh, device="meta", dtype=p.dtype).to_empty(device=p.device)
    new.load_full_state_dict(full)
    for name, child in new.named_children():
        setattr(model, name, child)
    model.tp = new.tp
    return model


def parallelize(model: nn.Module, mesh: Optional[Mesh] = None, plan: Optional[dict] = None) -> nn.Module:
    """Convert ``model`` to tensor parallelism over ``mesh``'s TP group (default mesh), in place.

    Preconditions: ``model`` holds the full weights, identical on every TP rank (same seed or
    the same checkpoint), and every TP rank calls this with the same plan. ``plan`` maps
    name patterns to styles (see module docstring); tandem's GPT needs none. Every pattern
    must match at least one module, and every match must be of the style's module type:
    anything else is an error, never a silent no-op. Returns ``model``.
    """
    mesh = mesh if mesh is not None else get_mesh()
    if mesh is None:
        raise ValueError("parallelize: no mesh given and no default mesh; call tandem.init_mesh(tp=...) first")
    from tandem.models.gpt import GPT

    if isinstance(model, GPT) and plan is None:
        return _parallelize_gpt(model, mesh)
    if plan is None:
        raise ValueError("parallelize: pass a plan ({pattern: style}); built-in plans: tandem.GPT2_PLAN, "
                         "tandem.LLAMA_PLAN (tandem's GPT needs none)")
    for pattern, style in plan.items():
        if style not in STYLES:
            raise ValueError(f"parallelize: unknown style {style!r} for pattern {pattern!r}; styles: {STYLES}")
    names = [n for n, _ in model.named_modules() if n]
    matches = {}
    for pattern, style in plan.items():
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise ValueError(f"parallelize: plan pattern {pattern!r} matches no module; module names look like "
                             f"{names[:6]}")
        for n in hit:
            if n in matches and matches[n] != style:
                raise ValueError(f"parallelize: module '{n}' matched by two patterns with styles "
                                 f"{matches[n]!r} and {style!r}")
            matches[n] = style
    modules = dict(model.named_modules())
    for name, style in matches.items():
        wants = nn.Embedding if style == "vocab" else nn.Linear
        if type(modules[name]) is not wants:
            raise TypeError(f"parallelize: '{name}' is a {type(modules[name]).__name__}, but style '{style}' "
                            f"applies to nn.{wants.__name__} only")
    if mesh.tp == 1:
        return model
    for name, style in matches.items():
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        with torch.no_grad():
            setattr(parent, child, _convert(name, modules[name], style, mesh))
    return model
