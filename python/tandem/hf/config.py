"""Hugging Face ``config.json`` <-> tandem's GPTConfig, for the architectures tandem runs.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (RMSNorm, RoPE, SwiGLU,
GQA) and GPT2LMHeadModel (LayerNorm, learned positions, GeLU, tied embeddings). Anything a
tandem GPT cannot compute exactly is refused with the field that says so.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from tandem.models.gpt import GPTConfig

__all__ = ["SUPPORTED", "read_config", "to_gpt_config", "from_gpt_config", "architecture_of"]

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")
_MODEL_TYPE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "GPT2LMHeadModel": "gpt2"}
_GELU = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def read_config(path: str) -> dict:
    """The ``config.json`` of a checkpoint directory (or the file itself) as a dict."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"tandem.hf: no config.json at '{path}'")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"tandem.hf: {file} is not valid JSON: {e}") from None


def architecture_of(hf: dict) -> str:
    """The checkpoint's architecture, one of SUPPORTED; ValueError naming it otherwise."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else {v: k for k, v in _MODEL_TYPE.items()}.get(hf.get("model_type"), None)
    if arch not in SUPPORTED:
        name = arch or f"model_type={hf.get('model_type')!r}"
        raise ValueError(f"tandem.hf: architecture {name} is not supported; supported: {', '.join(SUPPORTED)}")
    return arch


def _rope(hf: dict) -> tuple[float, Optional[dict]]:
    """(theta, Llama 3 scaling or None) from transformers 5's ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    legacy = hf.get("rope_scaling")
    if scaling is None and legacy and legacy.get("rope_type", legacy.get("type", "default")) != "default":
        scaling = dict(legacy)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor" or v != 1.0}
        if "partial_rotary_factor" in scaling:
            raise ValueError("tandem.hf: partial_rotary_factor != 1 is not supported")
    return float(theta), scaling


def _decoder_config(hf: dict, arch: str) -> GPTConfig:
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or h // heads
    if head_dim * heads != h:
        raise ValueError(f"tandem.hf: head_dim={head_dim} with {heads} heads != hidden_size={h}; "
                         "tandem's attention needs head_dim = hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"tandem.hf: hidden_act={hf['hidden_act']!r} is not supported ({arch} uses 'silu')")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if arch == "Qwen2ForCausalLM":
        bias, qkv_bias = False, True
    else:
        if attn_bias != mlp_bias:
            raise ValueError(f"tandem.hf: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                             "(tandem's GPT has biases on every projection or on none)")
        bias, qkv_bias = attn_bias, None
    max_len = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "MistralForCausalLM") else None
    if window:  # exact up to the window: tandem attends to every earlier token
        max_len = min(max_len, window)
    theta, scaling = _rope(hf)
    return GPTConfig(vocab_size=hf["vocab_size"], max_seq_len=max_len, num_layers=hf["num_hidden_layers"],
                     hidden_size=h, num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                     ffn_hidden_size=hf["intermediate_size"], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                     bias=bias, qkv_bias=qkv_bias, activation="swiglu", norm="rmsnorm",
                     norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope", rope_theta=theta,
                     rope_scaling=scaling)


def _gpt2_config(hf: dict) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU:
        raise ValueError(f"tandem.hf: GPT-2 activation_function={act!r} is not supported ({sorted(_GELU)})")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("tandem.hf: GPT-2 attention scaled otherwise than by 1/sqrt(head_dim) is not supported")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("tandem.hf: GPT-2 with untied embeddings is not supported")
    h = hf["n_embd"]
    return GPTConfig(vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"], num_layers=hf["n_layer"],
                     hidden_size=h, num_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner") or 4 * h,
                     tie_embeddings=True, bias=True, activation=_GELU[act], norm="layernorm",
                     norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position="learned")


def to_gpt_config(hf: dict) -> tuple[str, GPTConfig]:
    """(architecture, GPTConfig) of a Hugging Face config dict."""
    arch = architecture_of(hf)
    try:
        if arch == "GPT2LMHeadModel":
            return arch, _gpt2_config(hf)
        return arch, _decoder_config(hf, arch)
    except KeyError as e:
        raise ValueError(f"tandem.hf: config.json of {arch} lacks {e.args[0]!r}") from None


def from_gpt_config(cfg: GPTConfig, arch: Optional[str] = None, *, dtype: str = "float32") -> dict:
    """A Hugging Face config dict for ``cfg`` (``arch`` default: the one that matches it)."""
    if arch is None:
        if cfg.position == "learned":
            arch = "GPT2LMHeadModel"
        else:
            arch = "Qwen2ForCausalLM" if (cfg.qkv_bias and not cfg.bias) else "LlamaForCausalLM"
    if arch not in SUPPORTED:
        raise ValueError(f"tandem.hf: architecture {arch} is not supported; supported: {', '.join(SUPPORTED)}")
    kv = cfg.num_kv_heads or cfg.num_heads
    common = {"architectures": [arch], "model_type": _MODEL_TYPE[arch], "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype}
    if arch == "GPT2LMHeadModel":
        want = dict(position="learned", norm="layernorm", tie_embeddings=True, bias=True)
        _require(cfg, arch, want, kv == cfg.num_heads and cfg.activation in ("gelu", "gelu_tanh")
                 and cfg.qkv_bias in (None, True))
        return {**common, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
                "n_positions": cfg.max_seq_len, "n_inner": cfg.ffn_hidden_size,
                "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": cfg.norm_eps}
    _require(cfg, arch, dict(position="rope", norm="rmsnorm", activation="swiglu"), True)
    if arch == "Qwen2ForCausalLM":
        _require(cfg, arch, dict(bias=False, qkv_bias=True), True)
    elif cfg.qkv_bias not in (None, cfg.bias):
        raise ValueError(f"tandem.hf: {arch} has q/k/v biases only with every other bias (qkv_bias={cfg.qkv_bias}, "
                         f"bias={cfg.bias}); save it as Qwen2ForCausalLM")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    out = {**common, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": kv, "head_dim": cfg.hidden_size // cfg.num_heads,
           "intermediate_size": cfg.ffn_hidden_size, "max_position_embeddings": cfg.max_seq_len,
           "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "rope_parameters": rope,
           "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling}
    if arch != "Qwen2ForCausalLM":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if arch == "MistralForCausalLM":
        out["sliding_window"] = None
    return out


def _require(cfg: GPTConfig, arch: str, fields: dict, ok: bool) -> None:
    bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in fields.items() if getattr(cfg, k) != v]
    if bad or not ok:
        raise ValueError(f"tandem.hf: this GPTConfig cannot be saved as {arch}: "
                         + (", ".join(bad) or "its activation, heads or biases differ"))
