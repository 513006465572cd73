"""Choosing the next token: greedy, or sampled with temperature, top-k and top-p.

Sampling is the Gumbel-max trick, argmax(logits / T + g), with noise g drawn for the full
[B, V] from ``seed`` and the decoding step: the same tokens whatever the tp, pp or batching
of a run, which is what lets pipelined decoding be checked against the whole model's.
top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2020) keeps the smallest
set of tokens whose probabilities add up to at least p, as transformers' warpers do.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Sampling", "gumbel", "filter_logits", "pick"]


@dataclass(kw_only=True, frozen=True)
class Sampling:
    """How the next token is chosen."""

    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample from softmax(logits / temperature)"""
    top_k: Optional[int] = None
    """keep only the k most likely tokens (None: all)"""
    top_p: Optional[float] = None
    """keep the most likely tokens whose probabilities add up to top_p (None: all)"""
    seed: int = 0
    """seed of the sampling noise (the same on every rank)"""

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        try:
            seed = operator.index(self.seed)
        except TypeError:
            raise ValueError(f"seed must be an int, got {self.seed!r}") from None
        if not 0 <= seed < 1 << 40:
            raise ValueError(f"seed must be in 0 .. 2**40 - 1, got {seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p applies (they need the full vocabulary of a row)."""
        return not self.greedy and (self.top_k is not None or (self.top_p is not None and self.top_p < 1))


def gumbel(seed: int, step: int, batch: int, vocab: int, device) -> Tensor:
    """Gumbel noise [batch, vocab] of decoding step ``step``, a pure function of its arguments."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    u = torch.rand(batch, vocab, generator=g, dtype=torch.float64)
    return (-torch.log(-torch.log(u.clamp_min(1e-300)))).to(device)  # (B, V)


def filter_logits(logits: Tensor, top_k: Optional[int], top_p: Optional[float]) -> Tensor:
    """logits [b, V] with every token outside the top-k / top-p set at -inf."""
    out = logits.float()
    if top_k is not None and top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]  # (b, 1): the k-th largest
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p  # the set already reached p without this token (the first always stays)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def pick(logits: Tensor, sampling: Sampling, step: int, rows: Optional[Tensor] = None,
         batch: Optional[int] = None) -> Tensor:
    """The next token [b] from full-vocabulary logits [b, V]. ``rows`` of a ``batch``: which
    rows of the whole batch these are (the noise is drawn for the whole batch, so any grouping
    of the rows gives the same tokens)."""
    if sampling.greedy:
        return logits.argmax(-1)
    scores = filter_logits(logits, sampling.top_k, sampling.top_p) / sampling.temperature  # float32
    noise = gumbel(sampling.seed, step, batch or logits.shape[0], logits.shape[-1], logits.device)
    return (scores + (noise if rows is None else noise[rows])).argmax(-1)  # float64 sum
