"""What ``--model`` may name, read into a ModelSpec: a preset, a tandem ``GPTConfig`` (object
or JSON), a Hugging Face ``config.json`` (the file or its directory), or a ModelSpec's fields.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields

from tandem.plan.model import ModelSpec
from tandem.plan.presets import PRESETS

__all__ = ["load_model"]

_SPEC_FIELDS = {f.name for f in fields(ModelSpec)}


def _from_hf(cfg: dict, name: str) -> ModelSpec:
    """A Hugging Face config.json: Llama-class (num_hidden_layers, intermediate_size, ...) or
    GPT-2 (n_layer, n_embd, n_head, n_inner)."""
    if "n_layer" in cfg:  # GPT-2 names
        h = cfg["n_embd"]
        return ModelSpec(name=name, num_layers=cfg["n_layer"], hidden_size=h, num_heads=cfg["n_head"],
                         vocab_size=cfg["vocab_size"], ffn_hidden_size=cfg.get("n_inner") or 4 * h,
                         max_seq_len=cfg.get("n_positions", 1024), tie_embeddings=True)
    try:
        act = cfg.get("hidden_act", "silu")
        gated = act in ("silu", "swiglu") or cfg.get("model_type") in ("llama", "mistral", "qwen2")
        return ModelSpec(
            name=name, num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
            num_heads=cfg["num_attention_heads"], num_kv_heads=cfg.get("num_key_value_heads"),
            vocab_size=cfg["vocab_size"], ffn_hidden_size=cfg.get("intermediate_size"),
            max_seq_len=cfg.get("max_position_embeddings", 2048), gated_mlp=gated,
            norm="rmsnorm" if "rms_norm_eps" in cfg else "layernorm",
            bias=bool(cfg.get("attention_bias", False) or cfg.get("mlp_bias", False)),
            position="rope" if "rope_theta" in cfg or gated else "learned",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ValueError(f"{name}: a Hugging Face config needs {e.args[0]!r}") from None


def _from_gpt_config(fields_: dict, name: str) -> ModelSpec:
    from tandem.models import GPTConfig

    cfg = GPTConfig(**fields_)
    return ModelSpec(name=name, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                     num_kv_heads=cfg.num_kv_heads, vocab_size=cfg.vocab_size, ffn_hidden_size=cfg.ffn_hidden_size,
                     max_seq_len=cfg.max_seq_len, bias=cfg.bias, tie_embeddings=cfg.tie_embeddings)


def load_model(model) -> ModelSpec:
    """A ModelSpec from ``model``: a ModelSpec, a tandem ``GPTConfig``, a preset name (see
    ``tandem.plan.presets.PRESETS``), inline JSON, a path to a JSON file (a GPTConfig's fields, a Hugging
    Face config.json, or a ModelSpec's fields) or to a directory holding config.json, or
    a dict of any of those fields."""
    if isinstance(model, ModelSpec):
        return model
    if type(model).__name__ == "GPTConfig":
        return _from_gpt_config(dict(model.__dict__), "GPTConfig")
    name = "model"
    if isinstance(model, str) and model.lstrip().startswith("{"):  # inline JSON, as `tandem train --model`
        try:
            model = json.loads(model)
        except json.JSONDecodeError as e:
            raise ValueError(f"model: not valid JSON ({e})") from None
    if isinstance(model, str):
        if model in PRESETS:
            return PRESETS[model]
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if not os.path.isfile(path):
            raise ValueError(f"model {model!r}: not a preset ({', '.join(sorted(PRESETS))}), "
                             "nor a JSON file or a directory with config.json")
        with open(path) as f:
            try:
                model = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"model {path}: not valid JSON ({e})") from None
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) if path.endswith("config.json") \
            else os.path.splitext(os.path.basename(path))[0]
    if not isinstance(model, dict):
        raise TypeError(f"model must be a ModelSpec, GPTConfig, preset name, path or dict, got "
                        f"{type(model).__name__}")
    if "num_hidden_layers" in model or "n_layer" in model:
        return _from_hf(model, name)
    if set(model) <= _SPEC_FIELDS and ("gated_mlp" in model or "norm" in model or "position" in model
                                       or "name" in model):
        return ModelSpec(**model)
    try:
        return _from_gpt_config(model, name)
    except TypeError as e:
        raise ValueError(f"model {name}: neither a GPTConfig, a ModelSpec nor a Hugging Face config "
                         f"({e})") from None
