"""tandem's GPT, built from tandem.nn: a pre-norm decoder-only transformer, GPT-2-class
(LayerNorm, learned positions, GeLU) or Llama-class (RMSNorm, RoPE, SwiGLU, GQA, Qwen2's q/k/v
biases), by its config. It is the model of the tests, the demo, the benchmarks and of the
Hugging Face checkpoints that tandem.hf loads.

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
from tandem.nn.attention import KVCache, ParallelSelfAttention, positions
from tandem.nn.embedding import VocabParallelEmbedding, vocab_parallel_cross_entropy
from tandem.nn.linear import ColumnParallelLinear
from tandem.nn.mlp import ACTIVATIONS, ParallelMLP
from tandem.nn.rope import check_rope_scaling
from tandem.nn.state import FullStateDictMixin
from tandem.models.sampling import Sampling, pick
from tandem.recomputation import recompute

__all__ = ["GPT", "GPTConfig", "GPTEmbedding", "GPTBlock", "GPTHead", "next_token", "left_padding", "EndOfSequence"]


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
    """MLP activation: "gelu_tanh", "gelu" (erf) or "swiglu" (gated SiLU, Llama)"""
    sequence_parallel: bool = False
    """shard LayerNorm regions along the sequence over tp"""
    norm: str = "layernorm"
    """"layernorm" (GPT-2) or "rmsnorm" (Llama; statistics in float32)"""
    norm_eps: float = 1e-5
    """epsilon of every norm"""
    position: str = "learned"
    """"learned" position embeddings (GPT-2) or "rope" (rotary, in attention; Llama)"""
    rope_theta: float = 10000.0
    """RoPE base"""
    rope_scaling: Optional[dict] = None
    """Llama 3.1's RoPE scaling ({"rope_type": "llama3", "factor", ...}), or None"""
    qkv_bias: Optional[bool] = None
    """biases on q, k and v (None: as ``bias``; Qwen2: True with bias=False)"""
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
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"GPTConfig: norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"GPTConfig: norm_eps must be > 0, got {self.norm_eps}")
        if self.position not in ("learned", "rope"):
            raise ValueError(f"GPTConfig: position must be 'learned' or 'rope', got {self.position!r}")
        if self.position == "rope":
            if (self.hidden_size // self.num_heads) % 2:
                raise ValueError(f"GPTConfig: RoPE needs an even head dim, got {self.hidden_size // self.num_heads}")
            if not self.rope_theta > 0:
                raise ValueError(f"GPTConfig: rope_theta must be > 0, got {self.rope_theta}")
            check_rope_scaling(self.rope_scaling)
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"GPTConfig: num_heads={self.num_heads} is not divisible by num_kv_heads={kv}")
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


def _new_norm(config: GPTConfig, device, dtype) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps, device=device, dtype=dtype)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, device=device, dtype=dtype)


def _layer_norm(x: Tensor, ln: nn.Module, comm, sequence_parallel: bool) -> Tensor:
    """ln(x) (LayerNorm or RMSNorm) whose parameter gradients can be deferred to W (tandem.nn.wgrad)."""
    sp = sequence_parallel and comm is not None
    if isinstance(ln, nn.RMSNorm):
        # with sp each rank normalises its own tokens: the weight's gradient is summed over tp
        return W.rms_norm(x, C.reduce_grad(ln.weight, comm) if sp else ln.weight, ln.eps)
    if not sp:
        return W.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    # each rank normalises its own tokens: the LN parameters' gradients are summed over tp
    # (computed in B: they pass through that sum)
    return F.layer_norm(x, ln.normalized_shape, C.reduce_grad(ln.weight, comm), C.reduce_grad(ln.bias, comm), ln.eps)


class GPTEmbedding(FullStateDictMixin, nn.Module):
    """Token (vocab-parallel) + learned position embeddings (none with RoPE): ids [b, s] ->
    [b, s, h] ([b, s/tp, h] with sequence parallelism)."""

    def __init__(self, config: GPTConfig, *, mesh=None, device=None, dtype=None):
        super().__init__()
        self.config, self.tp = config, TPInfo(mesh)
        self.tok = VocabParallelEmbedding(config.vocab_size, config.hidden_size, mesh=mesh, device=device, dtype=dtype)
        self.pos = (nn.Embedding(config.max_seq_len, config.hidden_size, device=device, dtype=dtype)
                    if config.position == "learned" else None)

    def forward(self, ids: Tensor, offset: int = 0, pad: Optional[Tensor] = None) -> Tensor:
        """``offset``: position of the first token; ``pad`` [b]: left-padding tokens per row."""
        s = ids.shape[1]
        if offset + s > self.config.max_seq_len:
            raise ValueError(f"GPT: sequence of {offset + s} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.tok(ids)  # (b, s, h)
        if self.pos is not None:
            x = x + W.embedding(positions(ids.shape[0], s, offset, pad, ids.device), self.pos.weight)  # + (b|1, s, h)
        if self.config.sequence_parallel:
            x = C.scatter_to_sp(x, self.tp.comm, dim=1)  # (b, s, h) -> (b, s/tp, h)
        return x


class GPTBlock(FullStateDictMixin, nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x)) (ln: LayerNorm or RMSNorm)."""

    def __init__(self, config: GPTConfig, *, mesh=None, device=None, dtype=None):
        super().__init__()
        self.tp, sp = TPInfo(mesh), config.sequence_parallel
        factory = dict(mesh=mesh, device=device, dtype=dtype)
        self.ln1 = _new_norm(config, device, dtype)
        rope = config.position == "rope"
        self.attn = ParallelSelfAttention(config.hidden_size, config.num_heads, num_kv_heads=config.num_kv_heads,
                                          bias=config.bias, qkv_bias=config.qkv_bias,
                                          rope_theta=config.rope_theta if rope else None,
                                          rope_scaling=config.rope_scaling if rope else None,
                                          sequence_parallel=sp, **factory)
        self.ln2 = _new_norm(config, device, dtype)
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
        self.ln_f = _new_norm(config, device, dtype)
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
        offset, pad = (caches[0].length, caches[0].pad) if caches else (0, None)
        x = self.embed(ids, offset, pad)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None)
        logits = self.head(x)
        if targets is None:
            return logits
        return vocab_parallel_cross_entropy(logits, targets, mesh=self.tp.mesh)

    def new_caches(self, batch: int, max_seq_len: Optional[int] = None, *, pad: Optional[Tensor] = None) -> list:
        """Empty KV caches, one per block (``pad`` [batch]: left-padding tokens of each row)."""
        return [b.attn.new_cache(batch, max_seq_len or self.config.max_seq_len, pad=pad) for b in self.blocks]

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                 attention_mask: Optional[Tensor] = None, eos_token_id=None, pad_token_id: Optional[int] = None,
                 on_token=None) -> Tensor:
        """Decode up to ``max_new_tokens`` after ``prompt`` [b, s0] with the KV cache; returns
        [b, s0 + new].

        Greedy when temperature == 0, else sampled (top_k, top_p; ``seed`` makes it
        reproducible, tandem.models.sampling). ``attention_mask`` [b, s0]: 1 for tokens, 0
        for left padding (prompts of different lengths). ``eos_token_id`` (an id or a list): a
        row that produced it gets ``pad_token_id`` (default: the first EOS id) from then on,
        and decoding stops once every row has, as transformers' ``generate`` does.
        ``on_token(tokens [b])`` is called after each new token (streaming).
        """
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        b, s0 = prompt.shape
        if s0 + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"GPT.generate: {s0} + {max_new_tokens} tokens exceed max_seq_len={self.config.max_seq_len}")
        pad = left_padding(attention_mask, prompt.shape)
        stop = EndOfSequence(eos_token_id, pad_token_id, b, prompt.device)
        caches = self.new_caches(b, s0 + max_new_tokens, pad=pad)
        out, step_input = [prompt], prompt
        for t in range(max_new_tokens):
            logits = self(step_input, caches=caches)[:, -1]  # (b, V/tp), the last position
            logits = C.gather_from_tp(logits, self.tp.comm, dim=-1)  # (b, V): one position, cheap
            token = stop.apply(pick(logits, sampling, t))
            out.append(token[:, None])
            step_input = token[:, None]
            if on_token is not None:
                on_token(token)
            if stop.all_done:
                break
        return torch.cat(out, dim=1)


def next_token(logits: Tensor, temperature: float, seed: int = 0, step: int = 0) -> Tensor:
    """Greedy (temperature 0) or sampled next token from full-vocabulary logits [b, V] -> [b]."""
    return pick(logits, Sampling(temperature=temperature, seed=seed), step)


def left_padding(attention_mask: Optional[Tensor], shape) -> Optional[Tensor]:
    """Left-padding tokens per row [b] of a 0/1 attention mask [b, s0] (None: no padding);
    ValueError unless every row is zeros then ones with at least one token."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt {tuple(shape)}")
    mask = attention_mask.to(torch.int64)
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    pad = (mask == 0).sum(dim=1)  # (b,)
    ones_after = torch.arange(shape[1], device=mask.device)[None] >= pad[:, None]
    if not torch.equal(mask.bool(), ones_after):
        raise ValueError("attention_mask: padding must be on the left (each row zeros, then ones)")
    if (pad == shape[1]).any():
        raise ValueError("attention_mask: a row has no token")
    return None if not pad.any() else pad


class EndOfSequence:
    """Rows that produced an end-of-sequence token get ``pad`` afterwards."""

    def __init__(self, eos_token_id, pad_token_id: Optional[int], batch: int, device):
        ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.eos = torch.tensor(ids, dtype=torch.int64, device=device)
        self.pad = pad_token_id if pad_token_id is not None else (ids[0] if ids else 0)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)

    def apply(self, token: Tensor, rows=None) -> Tensor:
        """The tokens to emit, given the chosen ones [b] (of the batch's ``rows``, default
        all); marks the rows that end."""
        if self.eos.numel() == 0:
            return token
        rows = slice(None) if rows is None else rows
        done = self.done[rows]
        token = token.masked_fill(done, self.pad)
        self.done[rows] = done | torch.isin(token, self.eos)
        return token

    @property
    def all_done(self) -> bool:
        return self.eos.numel() > 0 and bool(self.done.all())
