"""ParallelSelfAttention: heads split over tp, grouped-query attention, optional KV cache.

Rank r holds query heads [r*H/tp, (r+1)*H/tp). Key/value heads:
  * num_kv_heads >= tp: split like the query heads (rank r holds KV/tp of them);
  * num_kv_heads <  tp: every KV head is replicated on tp/KV ranks. The k/v projections are
    then kept whole on every rank (they are small: KV * head_dim rows) and their gradients
    are summed over tp, so the replicas stay identical.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tandem.mesh import Mesh
from tandem.nn import _collectives as C
from tandem.nn import wgrad as W
from tandem.nn._tp import TPInfo, check_divisible, init_device, linear_init_
from tandem.nn.linear import ColumnParallelLinear, RowParallelLinear
from tandem.nn.rope import apply_rope, rope_cos_sin, rope_inv_freq
from tandem.nn.state import FullStateDictMixin

__all__ = ["ParallelSelfAttention", "KVCache", "positions", "attention_mask"]


@dataclass
class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    k, v: [batch, local_kv_heads, max_seq_len, head_dim], preallocated; ``length`` tokens are
    filled. It lives with the layer's rank (and pipeline stage) and is never gathered.
    ``pad`` [batch] (optional): how many left-padding tokens each row's prompt starts with;
    those keys are never attended to and the row's positions start after them.
    """

    k: Tensor
    v: Tensor
    length: int = 0
    pad: Optional[Tensor] = None

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, *, device=None, dtype=None,
              pad: Optional[Tensor] = None):
        shape = (batch, kv_heads, max_seq_len, head_dim)
        if pad is not None and tuple(pad.shape) != (batch,):
            raise ValueError(f"KVCache: pad must have shape ({batch},), got {tuple(pad.shape)}")
        pad = None if pad is None else pad.to(device=device, dtype=torch.int64)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   pad=pad)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [b, kv, s, hd] after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KVCache: {end} tokens exceed the cache's max_seq_len={self.k.shape[2]}")
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KVCache: batch {k.shape[0]} differs from the cache's batch {self.k.shape[0]}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def positions(batch: int, s: int, offset: int, pad: Optional[Tensor], device) -> Tensor:
    """Position ids [b or 1, s] of tokens offset .. offset+s-1, counted after each row's left pad."""
    pos = torch.arange(offset, offset + s, device=device)[None]  # (1, s)
    return pos if pad is None else (pos - pad[:, None]).clamp_min(0)  # (b, s)


def attention_mask(s: int, offset: int, pad: Optional[Tensor], device) -> Optional[Tensor]:
    """Boolean mask (True = attend) of s queries at offset .. offset+s-1 over offset+s keys:
    causal, and blind to each row's left padding -> [s, L] or [b, 1, s, L]; None without
    padding when s == 1 (every key is visible) or offset == 0 (SDPA's is_causal does it)."""
    if pad is None and (offset == 0 or s == 1):
        return None
    q = torch.arange(offset, offset + s, device=device)[:, None]  # (s, 1)
    k = torch.arange(offset + s, device=device)[None]  # (1, L)
    mask = k <= q  # (s, L)
    if pad is None:
        return mask
    mask = mask & (k >= pad[:, None, None])  # (b, s, L): padding keys hidden
    return (mask | (k == q))[:, None]  # a padding query sees itself (no empty softmax rows)


def _replicated_linear(in_features, out_features, bias, device, dtype) -> nn.Linear:
    """An nn.Linear kept whole on every TP rank, initialised with one set of draws."""
    lin = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias, device=device or "cpu", dtype=dtype)
    w = torch.empty(out_features, in_features, device=init_device(device))
    b = torch.empty(out_features, device=init_device(device)) if bias else None
    linear_init_(w, b, in_features)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(b)
    return lin


class ParallelSelfAttention(FullStateDictMixin, nn.Module):
    """Multi-head / grouped-query self-attention with torch SDPA, heads split over tp.

    Input [b, s, h] (with sequence_parallel: [b, s/tp, h]); output the same shape.
    Full weights as nn.Linear: q_proj [h, h], k_proj and v_proj [KV*hd, h], o_proj [h, h].
    ``bias``: biases of every projection; ``qkv_bias`` overrides it for q, k and v (Qwen2:
    qkv_bias=True, bias=False). ``rope_theta``: rotary position embeddings of q and k
    (tandem.nn.rope), with Llama 3's ``rope_scaling``; None: no positions here.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 bias: bool = True, qkv_bias: Optional[bool] = None, causal: bool = True,
                 rope_theta: Optional[float] = None, rope_scaling: Optional[dict] = None,
                 sequence_parallel: bool = False, overlap_chunks: int = 1, mesh: Optional[Mesh] = None,
                 device=None, dtype=None):
        super().__init__()
        name = "ParallelSelfAttention"
        kv = num_kv_heads or num_heads
        if hidden_size % num_heads:
            raise ValueError(f"{name}: hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if num_heads % kv:
            raise ValueError(f"{name}: num_heads={num_heads} is not divisible by num_kv_heads={kv}")
        self.tp = tp = TPInfo(mesh)
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, kv
        self.head_dim = hidden_size // num_heads
        self.causal, self.sequence_parallel = causal, sequence_parallel
        self.local_heads = check_divisible(name, "num_heads", num_heads, tp.size)
        self.kv_replicated = kv < tp.size
        if self.kv_replicated:
            if tp.size % kv:
                raise ValueError(f"{name}: num_kv_heads={kv} < tp={tp.size} must divide tp (each KV head is "
                                 f"replicated on tp/num_kv_heads ranks); use num_kv_heads in "
                                 f"{[d for d in range(1, tp.size + 1) if tp.size % d == 0]} or a multiple of {tp.size}")
            self.local_kv_heads = 1
            self.kv_head = tp.rank // (tp.size // kv)  # the KV head of this rank's query heads
        else:
            self.local_kv_heads = check_divisible(name, "num_kv_heads", kv, tp.size)
        factory = dict(device=device, dtype=dtype)
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.q_proj = ColumnParallelLinear(hidden_size, hidden_size, qkv_bias, mesh=mesh, **factory)
        kv_out = kv * self.head_dim
        if self.kv_replicated:
            self.k_proj = _replicated_linear(hidden_size, kv_out, qkv_bias, device, dtype)
            self.v_proj = _replicated_linear(hidden_size, kv_out, qkv_bias, device, dtype)
        else:
            self.k_proj = ColumnParallelLinear(hidden_size, kv_out, qkv_bias, mesh=mesh, **factory)
            self.v_proj = ColumnParallelLinear(hidden_size, kv_out, qkv_bias, mesh=mesh, **factory)
        # not a parameter or buffer: recomputed from the config, never checkpointed
        self.inv_freq = None if rope_theta is None else rope_inv_freq(self.head_dim, rope_theta, rope_scaling)
        self.o_proj = RowParallelLinear(hidden_size, hidden_size, bias, sequence_parallel=sequence_parallel,
                                        overlap_chunks=overlap_chunks, mesh=mesh, **factory)

    def _kv(self, x: Tensor, proj: nn.Module) -> Tensor:
        if not self.kv_replicated:
            return W.linear(x, proj.weight, proj.bias)  # (b, s, h) @ (h, KV*hd/tp) -> (b, s, KV*hd/tp)
        comm = self.tp.comm
        w, b = C.reduce_grad(proj.weight, comm), C.reduce_grad(proj.bias, comm)
        full = F.linear(x, w, b)  # (b, s, h) @ (h, KV*hd) -> (b, s, KV*hd)
        return full.narrow(-1, self.kv_head * self.head_dim, self.head_dim)  # this rank's KV head

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        comm = self.tp.comm
        # one entry into the TP region for q, k and v: (b, s/tp, h) all-gathered, or f
        x = C.gather_from_sp(x, comm, dim=1) if self.sequence_parallel else C.copy_to_tp(x, comm)
        b, s, _ = x.shape
        q = W.linear(x, self.q_proj.weight, self.q_proj.bias)  # (b, s, h) @ (h, h/tp) -> (b, s, h/tp)
        k, v = self._kv(x, self.k_proj), self._kv(x, self.v_proj)
        q = q.view(b, s, self.local_heads, self.head_dim).transpose(1, 2)  # (b, H/tp, s, hd)
        k = k.view(b, s, self.local_kv_heads, self.head_dim).transpose(1, 2)  # (b, KV/tp, s, hd)
        v = v.view(b, s, self.local_kv_heads, self.head_dim).transpose(1, 2)
        offset, pad = (0, None) if cache is None else (cache.length, cache.pad)
        if self.inv_freq is not None:  # rotate q and k by their positions (the cache keeps rotated keys)
            cos, sin = rope_cos_sin(positions(b, s, offset, pad, x.device), self.inv_freq, q.dtype)  # (b, 1, s, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (b, KV/tp, offset + s, hd)
        groups = self.local_heads // self.local_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask, is_causal = None, False
        if self.causal:
            mask = attention_mask(s, offset, pad, x.device)  # query i sits at offset + i, sees keys ..offset+i
            is_causal = mask is None and offset == 0 and s > 1
        out = self.attention_core(q, k, v, mask, is_causal)  # (b, H/tp, s, hd)
        out = out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)  # (b, s, h/tp)
        return self.o_proj(out)  # (b, s, h/tp) @ (h/tp, h) -> (b, s, h), all-reduced (or reduce-scattered)

    def attention_core(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """softmax(q k^T / sqrt(hd) + mask) v: (b, H/tp, s, hd) x 3 -> (b, H/tp, s, hd); what
        selective recomputation recomputes (tandem.recompute)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

    def new_cache(self, batch: int, max_seq_len: int, *, device=None, dtype=None,
                  pad: Optional[Tensor] = None) -> KVCache:
        """An empty cache for this layer's local KV heads (``pad``: left padding per row)."""
        p = self.q_proj.weight
        return KVCache.empty(batch, self.local_kv_heads, max_seq_len, self.head_dim,
                             device=device or p.device, dtype=dtype or p.dtype, pad=pad)
