"""Write tandem's GPT as a Hugging Face checkpoint that ``transformers`` loads, from any layout.

Each pipeline stage gathers its full (unsharded) parameters over tp, and its first TP rank of
the first data-parallel replica writes them, renamed and re-laid out for transformers
(``model-0000s-of-0000p.safetensors``); then global rank 0 writes the index, ``config.json``
and, when asked, the tokenizer files. Files go to ``PATH.partial`` first, and the directory is
renamed to ``PATH`` once every stage has written: a checkpoint appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from tandem.hf.config import from_gpt_config
from tandem.hf.names import sources

__all__ = ["save_model", "to_hf_state_dict"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "vocab.json", "merges.txt")


def to_hf_state_dict(full: dict, arch: str, cfg) -> dict:
    """tandem full tensors (any subset, e.g. one stage's) -> {checkpoint name: tensor}."""
    table = sources(arch, cfg)
    parts: dict = {}  # checkpoint name -> {section: tensor in tandem orientation}
    transposed = {}
    for key, tensor in full.items():
        if key not in table:
            raise KeyError(f"tandem.hf: tandem's {key} has no place in a {arch} checkpoint")
        srcs = table[key]
        for src, piece in zip(srcs, tensor.chunk(len(srcs), dim=0)):  # [gate; up] -> gate, up
            parts.setdefault(src.name, {})[src.section[0]] = piece
            transposed[src.name] = src.transpose
    out = {}
    for name, sections in parts.items():
        t = torch.cat([sections[i] for i in sorted(sections)], dim=0)  # q, k, v -> c_attn
        out[name] = (t.t() if transposed[name] else t).contiguous()
    return out


def _stage_full_state(module: nn.Module) -> dict:
    """tandem full parameter names -> full tensors, of a GPT or of pipeline StageModule(s).

    Collective over tp. A stage's layers are keyed by their index in ``GPT.layers()``:
    0 is the embedding, 1..L the blocks, L+1 the head; tied copies are skipped (the
    embedding's stage writes the weight)."""
    from tandem.models.gpt import GPT, GPTBlock, GPTEmbedding, GPTHead
    from tandem.nn.state import full_state_dict

    if isinstance(module, GPT):
        return module.full_state_dict()
    stages = list(module) if isinstance(module, (list, tuple, nn.ModuleList)) else [module]
    out = {}
    for st in stages:
        for index, layer in st.layers.items():
            if isinstance(layer, GPTEmbedding):
                prefix = "embed."
            elif isinstance(layer, GPTHead):
                prefix = "head."
            elif isinstance(layer, GPTBlock):
                prefix = f"blocks.{int(index) - 1}."
            else:
                raise TypeError(f"tandem.hf.save_model: a stage holds {type(layer).__name__}, not a GPT layer")
            for k, v in full_state_dict(layer).items():
                out[prefix + k] = v
    return out


def _config_of(module) -> Optional[object]:
    for m in (module.modules() if isinstance(module, nn.Module) else (x for s in module for x in s.modules())):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_layers"):
            return cfg
    return None


def save_model(model: Union[nn.Module, Sequence[nn.Module]], path: str, *, mesh=None, config=None,
               architecture: Optional[str] = None, tokenizer: Optional[str] = None) -> None:
    """Write ``model`` to ``path`` as a Hugging Face checkpoint; collective over every rank.

    ``model``: tandem's GPT (pp = 1, any tp), or with pp > 1 this rank's pipeline stage(s)
    (``split(gpt.layers(), pp)``), whose layers keep their global indices. ``config``: the
    GPTConfig (default: found on the layers). ``architecture``: default
    GPT2LMHeadModel for learned positions, Qwen2ForCausalLM for q/k/v-only biases, else
    LlamaForCausalLM. ``tokenizer``: a directory whose tokenizer files are copied along.
    """
    from tandem.mesh import Mesh, get_mesh

    mesh = mesh if mesh is not None else (get_mesh() or Mesh.single())
    cfg = config or _config_of(model)
    architecture = architecture or getattr(model, "architecture", None)  # as loaded by tandem.hf
    full = _stage_full_state(model)  # collective over tp
    dtype = next(iter(full.values())).dtype if full else torch.float32
    writer = mesh.tp_rank == 0 and mesh.dp_rank == 0
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    path = os.path.abspath(path)
    partial = path + ".partial"
    if rank0:
        if cfg is None:
            raise ValueError("tandem.hf.save_model: pass config= (no GPTConfig found on this rank's layers)")
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier()
    if writer:
        from safetensors.torch import save_file

        stage_cfg = cfg or _config_of(model)
        if stage_cfg is None:  # a middle stage of blocks only: the layout needs just the layer count
            raise ValueError("tandem.hf.save_model: pass config= (this stage's layers carry no GPTConfig)")
        arch = architecture or from_gpt_config(stage_cfg)["architectures"][0]
        tensors = {k: v.cpu() for k, v in to_hf_state_dict(full, arch, stage_cfg).items()}
        save_file(tensors, os.path.join(partial, f"model-{mesh.pp_rank + 1:05d}-of-{mesh.pp:05d}.safetensors"),
                  metadata={"format": "pt"})
    _barrier()
    if rank0:
        hf = from_gpt_config(cfg, architecture, dtype=str(dtype).removeprefix("torch."))
        _write_index(partial, mesh.pp)
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        if tokenizer is not None:
            for name in _TOKENIZER_FILES:
                if os.path.exists(os.path.join(tokenizer, name)):
                    shutil.copy(os.path.join(tokenizer, name), partial)
        old = path + ".old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def _write_index(directory: str, pp: int) -> None:
    from safetensors import safe_open

    weight_map, total = {}, 0
    for s in range(pp):
        name = f"model-{s + 1:05d}-of-{pp:05d}.safetensors"
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            for key in f.keys():
                weight_map[key] = name
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_parameters": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                  indent=2)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
