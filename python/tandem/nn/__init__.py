"""Drop-in torch.nn modules: tensor-parallel layers and tandem's fused kernels."""

from tandem.nn.attention import KVCache, ParallelSelfAttention
from tandem.nn.embedding import VocabParallelEmbedding, vocab_parallel_cross_entropy
from tandem.nn.fused import FusedLinearGELU
from tandem.nn.linear import ColumnParallelLinear, RowParallelLinear
from tandem.nn.mlp import ParallelMLP
from tandem.nn.state import full_state_dict, load_full_state_dict

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ParallelMLP",
    "ParallelSelfAttention",
    "KVCache",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "FusedLinearGELU",
    "full_state_dict",
    "load_full_state_dict",
]
