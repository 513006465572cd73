"""Preset models, and the published runs the planner's models are checked against.

Sources:

- ``megatron-*``: Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM", SC'21, Table 1 (heads, hidden size, layers; vocabulary
  51,200, sequence 2,048, tied embeddings, GeLU MLP of 4h, LayerNorm, biases). Layouts and
  microbatch sizes as in Megatron-LM's ``examples/sc21/run_table_1.sh``.
- ``gpt3-175b``: Brown et al. 2020, Table 2.1 (96 layers, d_model 12,288, 96 heads,
  context 2,048); vocabulary 50,257 padded to 51,200 (a multiple of 128 * 8, as Megatron-LM
  pads it for tensor parallelism up to 8).
- ``llama3-*``: Meta's published ``config.json`` of Llama 3 / 3.1 (8B, 70B, 405B):
  grouped-query attention with 8 KV heads, SwiGLU, RMSNorm, RoPE, no biases, vocabulary
  128,256, untied embeddings; context 8,192.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.plan.model import ModelSpec

__all__ = ["PRESETS", "PublishedRun", "MEGATRON_SC21_TABLE1"]


def _megatron(name: str, heads: int, hidden: int, layers: int) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, vocab_size=51200,
                     max_seq_len=2048, tie_embeddings=True)


def _llama(name: str, layers: int, hidden: int, heads: int, ffn: int) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=8,
                     ffn_hidden_size=ffn, vocab_size=128256, max_seq_len=8192, gated_mlp=True, norm="rmsnorm",
                     bias=False, position="rope", tie_embeddings=False)


@dataclass(frozen=True, kw_only=True)
class PublishedRun:
    """One row of a published table: a model, its layout and the throughput measured."""

    model: str
    """preset name"""
    params_billion: float
    """parameters as published"""
    tp: int
    pp: int
    gpus: int
    global_batch: int
    microbatch: int
    virtual_stages: int
    """model chunks per pipeline rank (1: plain 1F1B; > 1: the interleaved schedule)"""
    tflops_per_gpu: float
    """achieved, counting the recomputed forward (the paper's hardware count)"""

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


_TABLE1 = [  # params, heads, hidden, layers, tp, pp, gpus, batch, TFLOP/s, microbatch, layers per chunk
    ("1.7b", 1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 16, None),
    ("3.6b", 3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 16, None),
    ("7.5b", 7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 16, None),
    ("18b", 18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 8, None),
    ("39b", 39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 4, None),
    ("76b", 76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 2, 5),
    ("145b", 145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 2, 5),
    ("310b", 310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 1, 3),
    ("530b", 529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 1, 1),
    ("1t", 1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 1, None),
]

PRESETS: dict[str, ModelSpec] = {}
MEGATRON_SC21_TABLE1: list[PublishedRun] = []
for (_tag, _params, _heads, _hidden, _layers, _tp, _pp, _gpus, _batch, _tflops, _mb, _per_chunk) in _TABLE1:
    _name = f"megatron-{_tag}"
    PRESETS[_name] = _megatron(_name, _heads, _hidden, _layers)
    MEGATRON_SC21_TABLE1.append(PublishedRun(
        model=_name, params_billion=_params, tp=_tp, pp=_pp, gpus=_gpus, global_batch=_batch, microbatch=_mb,
        virtual_stages=1 if _per_chunk is None else _layers // (_pp * _per_chunk), tflops_per_gpu=_tflops))

PRESETS["gpt3-175b"] = ModelSpec(name="gpt3-175b", num_layers=96, hidden_size=12288, num_heads=96,
                                 vocab_size=51200, max_seq_len=2048, tie_embeddings=True)
PRESETS["llama3-8b"] = _llama("llama3-8b", 32, 4096, 32, 14336)
PRESETS["llama3-70b"] = _llama("llama3-70b", 80, 8192, 64, 28672)
PRESETS["llama3-405b"] = _llama("llama3-405b", 126, 16384, 128, 53248)
