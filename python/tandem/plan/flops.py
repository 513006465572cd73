"""FLOPs: the GEMMs of a transformer block on one TP rank, and the FLOP counts per step.

Per block, for T = b s tokens on one of tp ranks (kv = g * head_dim, f_in = f or 2f gated):

    q/k/v    (T x h) @ (h x (h + 2 kv)/tp)          column-parallel
    scores   a/tp x b x (s x hd) @ (hd x s)          attention core
    context  a/tp x b x (s x s) @ (s x hd)           attention core
    out      (T x h/tp) @ (h/tp x h)                 row-parallel
    fc1      (T x h) @ (h x f_in/tp)                 column-parallel
    fc2      (T x f/tp) @ (f/tp x h)                 row-parallel

The backward repeats each linear GEMM twice (input gradient, B; weight gradient, W) and
each attention-core GEMM twice (both input gradients, B). Forward FLOPs of a GPT block
(f = 4h, g = a) are 24 b s h^2 + 4 b s^2 h; the LM head adds 2 b s h V.

Counts per step (B sequences): the model count is three forwards (forward + backward);
the hardware count adds what recomputation runs again. Narayanan et al. (SC'21, eq. 3)
count 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) with full recomputation: exactly
``hardware_flops`` of their models.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Gemm", "block_gemms", "head_gemm", "forward_flops", "model_flops", "hardware_flops",
           "narayanan_flops"]


@dataclass(frozen=True)
class Gemm:
    """``batch`` GEMMs of (m x k) @ (k x n); ``core``: attention core (no weights)."""

    name: str
    m: int
    n: int
    k: int
    batch: int = 1
    core: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.batch


def _kv_width(model, tp: int) -> int:
    """k (or v) projection width on one rank: split over tp, or whole when g < tp."""
    return model.kv_size // tp if model.num_kv_heads >= tp else model.kv_size


def block_gemms(model, *, seq_len: int, microbatch: int, tp: int = 1) -> list[Gemm]:
    """The forward GEMMs of one block on one TP rank (see the module docstring)."""
    s, b, h, f = seq_len, microbatch, model.hidden_size, model.ffn_hidden_size
    T, hd, heads = s * b, model.head_dim, model.num_heads // tp
    return [Gemm("q/k/v", T, h // tp + 2 * _kv_width(model, tp), h),
            Gemm("scores", s, s, hd, batch=b * heads, core=True),
            Gemm("context", s, hd, s, batch=b * heads, core=True),
            Gemm("out", T, h, h // tp),
            Gemm("fc1", T, model.mlp_in_width // tp, h),
            Gemm("fc2", T, h, f // tp)]


def head_gemm(model, *, seq_len: int, microbatch: int, tp: int = 1) -> Gemm:
    return Gemm("lm head", seq_len * microbatch, model.vocab_size // tp, model.hidden_size)


def forward_flops(model, *, seq_len: int, sequences: int = 1) -> tuple[float, float, float]:
    """(block GEMMs without attention core, attention core, LM head) forward FLOPs of all
    blocks for ``sequences`` sequences, unsharded."""
    gemms = block_gemms(model, seq_len=seq_len, microbatch=1, tp=1)
    linear = sum(g.flops for g in gemms if not g.core) * model.num_layers * sequences
    core = sum(g.flops for g in gemms if g.core) * model.num_layers * sequences
    head = head_gemm(model, seq_len=seq_len, microbatch=1).flops * sequences
    return linear, core, head


def model_flops(model, *, seq_len: int, sequences: int) -> float:
    """Forward and backward (3 forwards) of every GEMM: the count behind MFU."""
    return 3 * sum(forward_flops(model, seq_len=seq_len, sequences=sequences))


def hardware_flops(model, *, seq_len: int, sequences: int, recompute: str = "none") -> float:
    """The model count plus the forward that recomputation runs again: all block GEMMs
    (full) or the attention core (selective)."""
    linear, core, _ = forward_flops(model, seq_len=seq_len, sequences=sequences)
    extra = {"none": 0.0, "selective": core, "full": linear + core}[recompute]
    return model_flops(model, seq_len=seq_len, sequences=sequences) + extra


def narayanan_flops(*, batch: int, seq_len: int, layers: int, hidden: int, vocab: int,
                    recompute: bool = True) -> float:
    """Narayanan et al. (SC'21) eq. 3: 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) with full
    recomputation; without it (their 72-factor form) the model count, whose exact logit
    term is V/(12 l h) (the head runs three times, not four)."""
    B, s, l, h, V = batch, seq_len, layers, hidden, vocab
    if recompute:
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))
