"""parallelize: turn a plain model into a tensor-parallel one, in place, by a plan.

A plan maps module-name patterns (fnmatch, matched against the full dotted name) to a style:

    "colwise"          Linear -> ColumnParallelLinear (output stays sharded)
    "colwise_gather"   Linear -> ColumnParallelLinear(gather_output=True) (full output)
    "colwise_qkv"      a fused [q; k; v] Linear (GPT-2's c_attn): each of its three equal
                       sections split over tp, so rank r holds the q, k and v of the same heads
    "colwise_kv"       the k or v projection of (grouped-query) attention: colwise when tp
                       divides its KV heads; with fewer KV heads than tp (tp a multiple of
                       them) the weight is replicated, each rank computing the KV head of its
                       query heads, the gradient summed over tp (ReplicatedKVProjection)
    "rowwise"          Linear -> RowParallelLinear (input is the sharded output of a colwise layer)
    "rowwise_scatter"  Linear -> RowParallelLinear(input_is_parallel=False)
    "vocab"            nn.Embedding -> VocabParallelEmbedding (padding_idx kept)

"Linear" is torch's nn.Linear or transformers' Conv1D (weight [in, out]; "colwise_kv" takes
nn.Linear only). The full weights are copied into each rank's shard; converted layers give
and take the original layout in ``full_state_dict()`` / ``load_full_state_dict()``.

Attention. A module with an integer ``head_dim`` attribute that holds converted layers is an
attention module: its projections are split at head boundaries (the head count must be
divisible by tp) and its own head attributes are set to this rank's share: ``num_heads`` /
``num_attention_heads``, ``num_key_value_heads`` / ``num_kv_heads``, ``num_key_value_groups``
and, with a "colwise_qkv" child, ``split_size`` (the width of one local section). Its forward
must take head counts from these attributes or from the projection widths
(``view(b, s, -1, head_dim)``), not from the model config: transformers' GPT-2, Llama, Mistral
and Qwen2 attention do, with ``attn_implementation`` "eager" or "sdpa" (both tested).

Tied weights. An embedding ("vocab") and an output head ("colwise" / "colwise_gather") that
share one weight (GPT-2, or tie_word_embeddings=True) are split alike, and after conversion the
head uses the embedding's shard: the tie, and its summed gradient, survive. A tied weight whose
partner the plan leaves alone, or shards differently, is an error.

With transformers' models the output head must be "colwise_gather": their forward computes
the loss from full logits. Dropout: every rank draws from its own generator, so give all TP
ranks the same seed (replicated activations need the same masks).

tandem's own GPT has a built-in plan: it is rebuilt at the mesh's TP degree from its full
weights.
"""

import fnmatch
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from tandem.mesh import Mesh, get_mesh
from tandem.nn.converted import (ColumnParallelConv1D, FusedColumnParallelLinear, PaddedVocabParallelEmbedding,
                                 ReplicatedKVProjection, RowParallelConv1D)
from tandem.nn.embedding import VocabParallelEmbedding
from tandem.nn.linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["parallelize", "GPT2_PLAN", "LLAMA_PLAN", "STYLES"]

STYLES = ("colwise", "colwise_gather", "colwise_qkv", "colwise_kv", "rowwise", "rowwise_scatter", "vocab")

GPT2_PLAN = {
    "transformer.wte": "vocab",
    "transformer.h.*.attn.c_attn": "colwise_qkv",
    "transformer.h.*.attn.c_proj": "rowwise",
    "transformer.h.*.mlp.c_fc": "colwise",
    "transformer.h.*.mlp.c_proj": "rowwise",
    "lm_head": "colwise_gather",
}
"""transformers' GPT2LMHeadModel (fused c_attn, Conv1D layers, lm_head tied to wte)."""

LLAMA_PLAN = {
    "model.embed_tokens": "vocab",
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.[kv]_proj": "colwise_kv",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise_gather",
}
"""transformers' LlamaForCausalLM, and MistralForCausalLM and Qwen2ForCausalLM (same module
names; Qwen2's q/k/v biases are split with their weights). Any num_key_value_heads that tp
divides or that divides tp."""

_LINEAR_STYLES = ("colwise", "colwise_gather", "colwise_qkv", "colwise_kv", "rowwise", "rowwise_scatter")
_PLAN_FOR = {"gpt2": "GPT2_PLAN", "llama": "LLAMA_PLAN", "mistral": "LLAMA_PLAN", "qwen2": "LLAMA_PLAN"}


@dataclass(kw_only=True)
class _Match:
    """One module the plan converts."""

    name: str
    module: nn.Module
    style: str
    kind: str  # "linear", "conv1d" or "embedding"
    parent: nn.Module
    replicate_kv: bool = False  # "colwise_kv" with fewer KV heads than tp


def _conv1d_type():
    """transformers' Conv1D class if transformers is loaded (a model using it imported it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def _kind(module: nn.Module) -> Optional[str]:
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Embedding:
        return "embedding"
    conv1d = _conv1d_type()
    return "conv1d" if conv1d is not None and type(module) is conv1d else None


def _in_out(m: _Match) -> tuple[int, int]:
    w = m.module.weight
    return (w.shape[1], w.shape[0]) if m.kind == "linear" else (w.shape[0], w.shape[1])  # Conv1D: [in, out]


def _check_type(m: _Match) -> None:
    wants = ("embedding",) if m.style == "vocab" else ("linear",) if m.style == "colwise_kv" else ("linear", "conv1d")
    if m.kind not in wants:
        names = {"linear": "nn.Linear", "conv1d": "transformers' Conv1D", "embedding": "nn.Embedding"}
        raise TypeError(f"parallelize: '{m.name}' is a {type(m.module).__name__}, but style '{m.style}' applies to "
                        f"{' or '.join(names[k] for k in wants)} only")
    if m.kind == "embedding":
        e = m.module
        for opt, default in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
            if getattr(e, opt) != default:
                raise ValueError(f"parallelize: '{m.name}' is an nn.Embedding with {opt}={getattr(e, opt)}, which "
                                 f"VocabParallelEmbedding does not support")


def _divides(name: str, what: str, value: int, tp: int) -> None:
    if value % tp:
        raise ValueError(f"parallelize: '{name}' has {what}={value}, which is not divisible by the tensor-parallel "
                         f"degree tp={tp}")


def _check_sizes(m: _Match, tp: int) -> None:
    """Divisibility of what the style splits (heads, when the parent is an attention module)."""
    if m.style == "vocab":
        return _divides(m.name, "num_embeddings", m.module.num_embeddings, tp)
    fan_in, fan_out = _in_out(m)
    head_dim = getattr(m.parent, "head_dim", None)
    head_dim = head_dim if isinstance(head_dim, int) and head_dim > 0 else None
    if m.style == "colwise_kv" and head_dim is None:
        raise ValueError(f"parallelize: style 'colwise_kv' of '{m.name}' needs the head size: its parent module "
                         f"({type(m.parent).__name__}) has no integer attribute head_dim")
    rowwise = m.style.startswith("rowwise")
    width, what = (fan_in, "in_features") if rowwise else (fan_out, "out_features")
    if m.style == "colwise_qkv":
        if width % 3:
            raise ValueError(f"parallelize: '{m.name}' has out_features={width}, not three equal q, k, v sections")
        width, what = width // 3, "section width (out_features/3)"
    if head_dim is None or m.style == "colwise_gather" or m.style == "rowwise_scatter":
        return _divides(m.name, what, width, tp)
    if width % head_dim:
        raise ValueError(f"parallelize: '{m.name}' has {what}={width}, not a multiple of its attention's "
                         f"head_dim={head_dim}")
    heads = width // head_dim
    if m.style == "colwise_kv" and heads < tp:
        if tp % heads:
            raise ValueError(f"parallelize: '{m.name}' has num_kv_heads={heads} (out_features={width} / head_dim="
                             f"{head_dim}), which neither divides nor is divisible by tp={tp}")
        m.replicate_kv = True
        return
    _divides(m.name, f"{'num_kv_heads' if m.style == 'colwise_kv' else 'heads'} (= {what} {width} / head_dim "
                     f"{head_dim})", heads, tp)


def _ties(model: nn.Module, matches: dict) -> list[tuple[str, str]]:
    """(head, embedding) pairs that share a weight and are split alike; anything else tied is an error."""
    owners = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append((mod_name, p_name))
    pairs = []
    for name, m in matches.items():
        for p_name, p in m.module.named_parameters(recurse=False):
            others = sorted({o for o in owners[id(p)] if o[0] != name})
            if not others:
                continue
            (other, other_p), mine = others[0], f"{name}.{p_name}"
            partner = matches.get(other)
            alike = (len(others) == 1 and p_name == other_p == "weight" and partner is not None
                     and {m.style, partner.style} in ({"vocab", "colwise"}, {"vocab", "colwise_gather"})
                     and m.kind != "conv1d" and partner.kind != "conv1d")
            if not alike:
                styles = ", ".join(f"'{o}.{q}' ({matches[o].style if o in matches else 'not in the plan'})"
                                   for o, q in others)
                raise ValueError(f"parallelize: '{mine}' ({m.style}) is tied to {styles}; a tied weight can only be "
                                 f"split as an embedding ('vocab') and its output head ('colwise' or "
                                 f"'colwise_gather'), both in the plan; untie it or plan both")
            if m.style != "vocab":
                pairs.append((name, other))
    return pairs


def _attention_updates(name: str, parent: nn.Module, children: list, tp: int) -> dict:
    """{attribute: local value} for the head attributes of the attention module ``name``."""
    updates = {}
    kv_child = next((m for m in children if m.style == "colwise_kv"), None)
    for attr in ("num_heads", "num_attention_heads"):
        value = getattr(parent, attr, None)
        if isinstance(value, int):
            _divides(name, attr, value, tp)
            updates[attr] = value // tp
    for attr in ("num_key_value_heads", "num_kv_heads"):
        value = getattr(parent, attr, None)
        if isinstance(value, int):
            updates[attr] = value // tp if value >= tp else 1
    groups = getattr(parent, "num_key_value_groups", None)
    if isinstance(groups, int) and kv_child is not None and kv_child.replicate_kv:
        kv = _in_out(kv_child)[1] // parent.head_dim
        updates["num_key_value_groups"] = groups * kv // tp  # H/tp query heads share one KV head
    split = getattr(parent, "split_size", None)
    if isinstance(split, int) and any(m.style == "colwise_qkv" for m in children):
        updates["split_size"] = split // tp
    return updates


def _convert(m: _Match, mesh: Mesh) -> nn.Module:
    module, w = m.module, m.module.weight
    factory = dict(mesh=mesh, device="meta", dtype=w.dtype)
    if m.style == "vocab":
        pad = module.padding_idx
        new = (VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, **factory) if pad is None else
               PaddedVocabParallelEmbedding(module.num_embeddings, module.embedding_dim, padding_idx=pad, **factory))
        full = {"weight": w.detach()}
    else:
        fan_in, fan_out = _in_out(m)
        bias = module.bias is not None
        conv1d = m.kind == "conv1d"
        if m.replicate_kv:
            head_dim = m.parent.head_dim
            new = ReplicatedKVProjection(fan_in, fan_out // head_dim, head_dim, bias, **factory)
        elif m.style == "colwise_qkv":
            new = (ColumnParallelConv1D if conv1d else FusedColumnParallelLinear)(fan_in, fan_out, bias, sections=3,
                                                                                 **factory)
        elif m.style.startswith("colwise"):
            new = (ColumnParallelConv1D if conv1d else ColumnParallelLinear)(
                fan_in, fan_out, bias, gather_output=m.style == "colwise_gather", **factory)
        else:
            new = (RowParallelConv1D if conv1d else RowParallelLinear)(
                fan_in, fan_out, bias, input_is_parallel=m.style == "rowwise", **factory)
        full = {"weight": w.detach(), **({"bias": module.bias.detach()} if bias else {})}
    new = new.to_empty(device=w.device)
    if isinstance(new, ReplicatedKVProjection):
        new.load_state_dict(full)  # the whole weight, on every rank
    else:
        new.load_full_state_dict(full)
    for p_name, p in new.named_parameters():
        p.requires_grad_(getattr(module, p_name).requires_grad)
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


def _match(model: nn.Module, plan: dict) -> dict:
    for pattern, style in plan.items():
        if style not in STYLES:
            raise ValueError(f"parallelize: unknown style {style!r} for pattern {pattern!r}; styles: {STYLES}")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    matches = {}
    for pattern, style in plan.items():
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise ValueError(f"parallelize: plan pattern {pattern!r} matches no module; module names look like "
                             f"{names[:6]}")
        for n in hit:
            if n in matches and matches[n].style != style:
                raise ValueError(f"parallelize: module '{n}' matched by two patterns with styles "
                                 f"{matches[n].style!r} and {style!r}")
            parent_name = n.rpartition(".")[0]
            matches[n] = _Match(name=n, module=modules[n], style=style, kind=_kind(modules[n]),
                                parent=modules[parent_name] if parent_name else model)
    return matches


def parallelize(model: nn.Module, mesh: Optional[Mesh] = None, plan: Optional[dict] = None) -> nn.Module:
    """Convert ``model`` to tensor parallelism over ``mesh``'s TP group (default mesh), in place.

    Preconditions: ``model`` holds the full weights, identical on every TP rank (same seed or
    the same checkpoint), and every TP rank calls this with the same plan. ``plan`` maps
    name patterns to styles (see module docstring); tandem's GPT needs none. Every pattern
    must match at least one module, every match must be of the style's module type, and
    every split size must be divisible by tp: all of it is checked before any module is
    converted, and anything else is an error, never a silent no-op. Returns ``model``.
    """
    mesh = mesh if mesh is not None else get_mesh()
    if mesh is None:
        raise ValueError("parallelize: no mesh given and no default mesh; call tandem.init_mesh(tp=...) first")
    from tandem.models.gpt import GPT

    if isinstance(model, GPT) and plan is None:
        return _parallelize_gpt(model, mesh)
    if plan is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        hint = f" (for this {model_type} model: tandem.{_PLAN_FOR[model_type]})" if model_type in _PLAN_FOR else ""
        raise ValueError(f"parallelize: pass a plan ({{pattern: style}}){hint}; built-in plans: tandem.GPT2_PLAN, "
                         "tandem.LLAMA_PLAN (tandem's GPT needs none)")
    tp = mesh.tp
    matches = _match(model, plan)
    for m in matches.values():  # everything is checked before anything is converted
        _check_type(m)
        _check_sizes(m, tp)
    tied = _ties(model, matches)
    attention = {}
    for m in matches.values():
        if m.style in _LINEAR_STYLES and isinstance(getattr(m.parent, "head_dim", None), int):
            attention.setdefault(id(m.parent), (m.name.rpartition(".")[0], m.parent, []))[2].append(m)
    updates = [(parent, _attention_updates(name, parent, children, tp))
               for name, parent, children in attention.values()]
    if tp == 1:
        return model
    for m in matches.values():
        with torch.no_grad():
            setattr(m.parent, m.name.rpartition(".")[2], _convert(m, mesh))
    modules = dict(model.named_modules())
    for head, embedding in tied:  # the head reads the embedding's shard: one parameter, as before
        modules[head].weight = modules[embedding].weight
    for parent, attrs in updates:
        for attr, value in attrs.items():
            setattr(parent, attr, value)
    return model
