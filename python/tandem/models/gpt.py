"""A small pre-LN GPT built from tandem.nn: the model of the tests, the demo and the benchmarks.

With tp = 1 (no mesh, or a mesh with tp=1) it is a plain single-device model. Its layers
are ``[embed, *blocks, head]`` (see :meth:`GPT.layers`), the units a pipeline splits.
"""

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tandem.mesh import Mesh
from tandem.nn import _collectives as C
from tandem.nn import wgrad as W
from tandem.nn._tp import TPInfo
from tandem.nn.attention import KVCache, ParallelSelfAttention
from tandem.nn.embedding import VocabParallelEmbedding, vocab_parallel_cross_entropy
from tandem.nn.linear import ColumnParallelLinear
from tandem.nn.mlp import ParallelMLP
from tandem.nn.state import FullStateDictMixin
from tandem.recomputation import recompute

__all__ = ["GPT", "GPTConfig", "GPTEmbedding", "GPTBlock", "GPTHead", "next_token"]


@dataclass(kw_only=True)
class GPTConfig:
    """Shape of a tandem GPT."""

    vocab_size: int = 256
    """number of token ids (divisible by tp)"""
    max_seq_len: int = 64
    """longest sequence (learned position embeddings)"""
    num_layers: int = 2
    """transformer blocks"""
    hidden_size: int = 64
    """model width h"""
    num_heads: int = 4
    """query heads (divisible by tp)"""
    num_kv_heads: Optional[int] = None
    """key/value heads for grouped-query attention (None: num_heads)"""
    ffn_hidden_size: Optional[int] = None
    """MLP width (None: 4 * hidden_size)"""
    tie_embeddings: bool = False
    """LM head shares the token embedding's weight"""
    bias: bool = True
    """biases in every linear layer"""
    activation: str = "gelu_tanh"
    """MLP activation: "gelu_tanh" or "gelu" (erf)"""
    sequence_parallel: bool = False
    """shard LayerNorm regions along the sequence over tp"""
    recompute: str = "none"
    """activation recomputation of every block: "none", "selective" (attention core) or "full" (tandem.recompute)"""

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "num_layers", "hidden_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"GPTConfig: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"GPTConfig: activation must be 'gelu' or 'gelu_tanh', got {self.activation!r}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"GPTConfig: recompute must be 'none', 'selective' or 'full', got {self.recompute!r}")

    def check_tp(self, tp: int) -> None:
        """Raise ValueError naming every size that tp does not divide."""
        bad = [f"{n}={getattr(self, n)}" for n in ("vocab_size", "num_heads", "ffn_hidden_size")
               if getattr(self, n) % tp]
        kv = self.num_kv_heads or self.num_heads
        if kv % tp and tp % kv:
            bad.append(f"num_kv_heads={kv} (must divide tp or be a multiple of it)")
        if bad:
            raise ValueError(f"GPTConfig: not divisible by tp={tp}: {', '.join(bad)}")


def _layer_norm(x: Tensor, ln: nn.LayerNorm, comm, sequence_parallel: bool) -> Tensor:
    """ln(x) whose parameter gradients can be deferred to W (tandem.nn.wgrad)."""
    if not sequence_parallel or comm is None:
        return W.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    # each rank normalises its own tokens: the LN parameters' gradients are summed over tp
    # (computed in B: they pass through that sum)
    return F.layer_norm(x, ln.normalized_shape, C.reduce_grad(ln.weight, comm), C.reduce_grad(ln.bias, comm), ln.eps)


class GPTEmbedding(FullStateDictMixin, nn.Module):
    """Token (vocab-parallel) + learned position embeddings: ids [b, s] -> [b, s, h]
    ([b, s/tp, h] with sequence parallelism)."""

    def __init__(self, config: GPTConfig, *, mesh=None, device=None, dtype=None):
        super().__init__()
        self.config, self.tp = config, TPInfo(mesh)
        self.tok = VocabParallelEmbedding(config.vocab_size, config.hidden_size, mesh=mesh, device=device, dtype=dtype)
        self.pos = nn.Embedding(config.max_seq_len, config.hidden_size, device=device, dtype=dtype)

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        s = ids.shape[1]
        if offset + s > self.config.max_seq_len:
            raise ValueError(f"GPT: sequence of {offset + s} tokens exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(offset, offset + s, device=ids.device)
        x = self.tok(ids) + W.embedding(pos, self.pos.weight)  # (b, s, h)
        if self.config.sequence_parallel:
            x = C.scatter_to_sp(x, self.tp.comm, dim=1)  # (b, s, h) -> (b, s/tp, h)
        return x


class GPTBlock(FullStateDictMixin, nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: GPTConfig, *, mesh=None, device=None, dtype=None):
        super().__init__()
        self.tp, sp = TPInfo(mesh), config.sequence_parallel
        factory = dict(mesh=mesh, device=device, dtype=dtype)
        self.ln1 = nn.LayerNorm(config.hidden_size, device=device, dtype=dtype)
        self.attn = ParallelSelfAttention(config.hidden_size, config.num_heads, num_kv_heads=config.num_kv_heads,
                                          bias=config.bias, sequence_parallel=sp, **factory)
        self.ln2 = nn.LayerNorm(config.hidden_size, device=device, dtype=dtype)
        self.mlp = ParallelMLP(config.hidden_size, config.ffn_hidden_size, activation=config.activation,
                               bias=config.bias, sequence_parallel=sp, **factory)
        self.sequence_parallel = sp

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        comm, sp = self.tp.comm, self.sequence_parallel
        x = x + self.attn(_layer_norm(x, self.ln1, comm, sp), cache)
        return x + self.mlp(_layer_norm(x, self.ln2, comm, sp))


class GPTHead(FullStateDictMixin, nn.Module):
    """Final LayerNorm and the LM head: [b, s, h] -> vocab-sharded logits [b, s, V/tp].

    With tied embeddings the head multiplies by the token embedding's (sharded) weight.
    """

    def __init__(self, config: GPTConfig, *, embedding: Optional[VocabParallelEmbedding] = None,
                 mesh=None, device=None, dtype=None):
        super().__init__()
        self.config, self.tp = config, TPInfo(mesh)
        self.ln_f = nn.LayerNorm(config.hidden_size, device=device, dtype=dtype)
        if config.tie_embeddings:
            if embedding is None:
                raise ValueError("GPTHead: tie_embeddings=True needs the token embedding")
            self.lm_head = None
            self._tied = [embedding]  # a list, so the embedding is not registered twice
        else:
            self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False,
                                                mesh=mesh, device=device, dtype=dtype)

    @property
    def weight(self) -> Tensor:
        return self._tied[0].weight if self.lm_head is None else self.lm_head.weight

    def tied_source(self) -> Optional[nn.Module]:
        """The module whose ``weight`` this head multiplies by when tied (None when untied)."""
        return self._tied[0] if self.lm_head is None else None

    def with_tied_weight(self, holder: nn.Module) -> "GPTHead":
        """A shallow copy of this tied head that multiplies by ``holder.weight`` instead (a
        pipeline stage's own copy of the tied embedding); every other submodule is shared."""
        if self.lm_head is not None:
            raise ValueError("GPTHead.with_tied_weight: this head is not tied (tie_embeddings=False)")
        head = copy.copy(self)
        head._tied = [holder]
        return head

    def forward(self, x: Tensor) -> Tensor:
        comm, sp = self.tp.comm, self.config.sequence_parallel
        x = _layer_norm(x, self.ln_f, comm, sp)
        x = C.gather_from_sp(x, comm, dim=1) if sp else C.copy_to_tp(x, comm)  # (b, s, h) on every rank
        return W.linear(x, self.weight)  # (b, s, h) @ (h, V/tp) -> (b, s, V/tp)


class GPT(FullStateDictMixin, nn.Module):
    """GPT(config, mesh=None): ids [b, s] -> vocab-sharded logits [b, s, V/tp], or the mean
    cross-entropy loss when ``targets`` [b, s] are given."""

    def __init__(self, config: GPTConfig, *, mesh: Optional[Mesh] = None, device=None, dtype=None):
        super().__init__()
        self.config, self.tp = config, TPInfo(mesh)
        config.check_tp(self.tp.size)
        factory = dict(mesh=mesh, device=device, dtype=dtype)
        self.embed = GPTEmbedding(config, **factory)
        self.blocks = nn.ModuleList(GPTBlock(config, **factory) for _ in range(config.num_layers))
        for block in self.blocks:
            recompute(block, config.recompute)
        self.head = GPTHead(config, embedding=self.embed.tok, **factory)

    def layers(self) -> list:
        """[embed, block 0, ..., block L-1, head]: the units of a pipeline split."""
        return [self.embed, *self.blocks, self.head]

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, *,
                caches: Optional[list] = None) -> Tensor:
        offset = caches[0].length if caches else 0
        x = self.embed(ids, offset)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None)
        logits = self.head(x)
        if targets is None:
            return logits
        return vocab_parallel_cross_entropy(logits, targets, mesh=self.tp.mesh)

    def new_caches(self, batch: int, max_seq_len: Optional[int] = None) -> list:
        return [b.attn.new_cache(batch, max_seq_len or self.config.max_seq_len) for b in self.blocks]

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: Optional[torch.Generator] = None, on_token=None) -> Tensor:
        """Decode ``max_new_tokens`` after ``prompt`` [b, s0] with the KV cache; returns [b, s0 + new].

        Greedy when temperature == 0, else sampled (seed ``generator`` identically on every TP
        rank). ``on_token(tokens [b])`` is called after each new token (streaming).
        """
        b, s0 = prompt.shape
        if s0 + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"GPT.generate: {s0} + {max_new_tokens} tokens exceed max_seq_len={self.config.max_seq_len}")
        caches = self.new_caches(b, s0 + max_new_tokens)
        out, step_input = [prompt], prompt
        for _ in range(max_new_tokens):
            logits = self(step_input, caches=caches)[:, -1]  # (b, V/tp), the last position
            logits = C.gather_from_tp(logits, self.tp.comm, dim=-1)  # (b, V): one position, cheap
            token = next_token(logits, temperature, generator)
            out.append(token[:, None])
            step_input = token[:, None]
            if on_token is not None:
                on_token(token)
        return torch.cat(out, dim=1)


def next_token(logits: Tensor, temperature: float, generator: Optional[torch.Generator]) -> Tensor:
    """Greedy (temperature 0) or sampled next token from full-vocabulary logits [b, V] -> [b]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
