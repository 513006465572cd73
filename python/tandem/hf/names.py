"""Which Hugging Face tensors make each parameter of tandem's GPT.

``sources(arch, cfg)`` maps every full (tp=1) parameter name of tandem's GPT to the list of
checkpoint tensors it is made of, concatenated along the output dimension (dim 0 in
nn.Linear's [out, in] orientation):

    Llama / Mistral / Qwen2                     GPT-2 (Conv1D: stored [in, out], transposed)
    embed.tok.weight    model.embed_tokens      embed.tok / embed.pos    transformer.wte / wpe
    blocks.i.ln1        input_layernorm         blocks.i.ln1 / ln2       h.i.ln_1 / ln_2
    blocks.i.attn.q/k/v self_attn.q/k/v_proj    blocks.i.attn.q/k/v      h.i.attn.c_attn, 3 sections
    blocks.i.attn.o     self_attn.o_proj        blocks.i.attn.o_proj     h.i.attn.c_proj
    blocks.i.ln2        post_attention_layernorm
    blocks.i.mlp.fc1    [mlp.gate_proj; up_proj] blocks.i.mlp.fc1 / fc2  h.i.mlp.c_fc / c_proj
    blocks.i.mlp.fc2    mlp.down_proj
    head.ln_f           model.norm              head.ln_f                transformer.ln_f
    head.lm_head        lm_head (untied only)   (tied to wte)
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.models.gpt import GPTConfig

__all__ = ["Source", "sources"]


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor, or a section of it, in tandem's orientation."""

    name: str
    """tensor name in the checkpoint"""
    transpose: bool = False
    """stored [in, out] (GPT-2's Conv1D): tandem's [out, in] is its transpose"""
    section: tuple = (0, 1)
    """(i, n): the i-th of n equal parts along the output dimension (GPT-2's fused c_attn)"""


def _decoder(cfg: GPTConfig) -> dict:
    out = {"embed.tok.weight": [Source("model.embed_tokens.weight")],
           "head.ln_f.weight": [Source("model.norm.weight")]}
    if not cfg.tie_embeddings:
        out["head.lm_head.weight"] = [Source("lm_head.weight")]
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    for i in range(cfg.num_layers):
        t, h = f"blocks.{i}.", f"model.layers.{i}."
        out[t + "ln1.weight"] = [Source(h + "input_layernorm.weight")]
        out[t + "ln2.weight"] = [Source(h + "post_attention_layernorm.weight")]
        for p in "qkv":
            out[t + f"attn.{p}_proj.weight"] = [Source(h + f"self_attn.{p}_proj.weight")]
            if qkv_bias:
                out[t + f"attn.{p}_proj.bias"] = [Source(h + f"self_attn.{p}_proj.bias")]
        out[t + "attn.o_proj.weight"] = [Source(h + "self_attn.o_proj.weight")]
        out[t + "mlp.fc1.weight"] = [Source(h + "mlp.gate_proj.weight"), Source(h + "mlp.up_proj.weight")]
        out[t + "mlp.fc2.weight"] = [Source(h + "mlp.down_proj.weight")]
        if cfg.bias:
            out[t + "attn.o_proj.bias"] = [Source(h + "self_attn.o_proj.bias")]
            out[t + "mlp.fc1.bias"] = [Source(h + "mlp.gate_proj.bias"), Source(h + "mlp.up_proj.bias")]
            out[t + "mlp.fc2.bias"] = [Source(h + "mlp.down_proj.bias")]
    return out


def _gpt2(cfg: GPTConfig, prefix: str) -> dict:
    out = {"embed.tok.weight": [Source(prefix + "wte.weight")], "embed.pos.weight": [Source(prefix + "wpe.weight")],
           "head.ln_f.weight": [Source(prefix + "ln_f.weight")], "head.ln_f.bias": [Source(prefix + "ln_f.bias")]}
    for i in range(cfg.num_layers):
        t, h = f"blocks.{i}.", f"{prefix}h.{i}."
        for ln, hf_ln in (("ln1", "ln_1"), ("ln2", "ln_2")):
            for p in ("weight", "bias"):
                out[t + f"{ln}.{p}"] = [Source(h + f"{hf_ln}.{p}")]
        for j, p in enumerate("qkv"):
            out[t + f"attn.{p}_proj.weight"] = [Source(h + "attn.c_attn.weight", True, (j, 3))]
            out[t + f"attn.{p}_proj.bias"] = [Source(h + "attn.c_attn.bias", False, (j, 3))]
        for mine, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[t + f"{mine}.weight"] = [Source(h + f"{theirs}.weight", True)]
            out[t + f"{mine}.bias"] = [Source(h + f"{theirs}.bias")]
    return out


def sources(arch: str, cfg: GPTConfig, names=()) -> dict:
    """{tandem full parameter name: [Source, ...]} for a checkpoint of ``arch``. ``names``:
    the checkpoint's tensor names, to tell GPT-2 checkpoints saved with or without the
    ``transformer.`` prefix apart."""
    if arch == "GPT2LMHeadModel":
        prefix = "transformer." if any(n.startswith("transformer.") for n in names) or not names else ""
        return _gpt2(cfg, prefix)
    return _decoder(cfg)
