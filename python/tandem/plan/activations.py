"""Activation memory: the tensors a transformer block keeps for its backward, term by term.

Each term is one saved tensor of one microbatch (b sequences of s tokens) with its size
before any parallelism and how tensor parallelism divides it:

- ``"tp"``: inside the TP region ([.., h/tp], heads/tp), divided by tp;
- ``"sp"``: in the LayerNorm/residual region, replicated over tp, divided by tp only with
  sequence parallelism;
- ``"none"``: never divided (tandem keeps the all-gathered input of a column-parallel
  GEMM whole under sequence parallelism).

Two term lists:

``"megatron"``: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", Section 4 (16-bit activations, 1-byte dropout masks). Per block:
sbh(34 + 5as/h) without parallelism, sbh(10 + 24/t + 5as/(ht)) with TP,
sbh(34/t + 5as/(ht)) with TP and SP; selective recomputation drops the 5as/h terms
(attention core); full recomputation keeps 2sbh (the block's input).

``"tandem"``: tandem's GPT block as implemented (fused attention, no dropout), found by
reading its autograd and checked against ``torch.autograd.graph.saved_tensors_hooks``
(:mod:`tandem.plan.saved`). Differences to Megatron's block (16-bit, per block):
no dropout masks (-2sbh), no s x s scores (fused attention keeps an fp32 log-sum-exp,
4asb/t, instead of 5as^2b/t), fp32 LayerNorm statistics (+16sb), and under SP the inputs
of the q/k/v and fc1 GEMMs are kept all-gathered (2 x 2sbh, not divided by t).
Grouped-query attention: tandem repeats K and V to the query heads before attention, so
they are kept at the query heads' size.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

__all__ = ["ActivationTerm", "layer_terms", "embedding_terms", "head_terms", "bytes_per_gpu",
           "layer_activation_bytes", "recompute_working_bytes"]

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class ActivationTerm:
    """One saved tensor of one microbatch: ``size`` bytes before parallelism, divided as
    ``split`` says ("tp", "sp" or "none"); ``core``: part of the attention core that
    selective recomputation rebuilds instead of keeping."""

    name: str
    size: Fraction
    split: str
    core: bool = False

    def per_gpu(self, tp: int, sequence_parallel: bool) -> Fraction:
        divided = self.split == "tp" or (self.split == "sp" and sequence_parallel)
        return self.size / tp if divided else self.size


def _sizes(model, seq_len: int, microbatch: int):
    s, b, h = seq_len, microbatch, model.hidden_size
    return Fraction(s * b), Fraction(s * b * h), s, b, h


def layer_terms(model, *, seq_len: int, microbatch: int, saved: str = "tandem", dropout: bool = False,
                dtype_bytes: int = 2, stats_bytes: int = 4) -> list[ActivationTerm]:
    """The saved tensors of one block (see the module docstring). ``dtype_bytes``: bytes of
    an activation element; ``stats_bytes``: of LayerNorm statistics and the attention
    log-sum-exp (fp32 on GPUs)."""
    sb, sbh, s, b, h = _sizes(model, seq_len, microbatch)
    a, e, f = model.num_heads, dtype_bytes, model.ffn_hidden_size
    kv = Fraction(model.kv_size, h)  # K (and V) width over h
    T = ActivationTerm
    if saved == "megatron":
        terms = [T("layernorm 1 input", 2 * sbh, "sp"), T("q/k/v GEMM input", 2 * sbh, "sp"),
                 T("Q", 2 * sbh, "tp"), T("K", 2 * sbh * kv, "tp"),
                 T("softmax output", 2 * a * s * s * b, "tp", core=True)]
        if dropout:
            terms += [T("softmax dropout mask", a * s * s * b, "tp", core=True),
                      T("softmax dropout output", 2 * a * s * s * b, "tp", core=True)]
        terms += [T("V", 2 * sbh * kv, "tp"), T("output projection input", 2 * sbh, "tp")]
        if dropout:
            terms.append(T("attention dropout mask", sbh, "sp"))
        terms += [T("layernorm 2 input", 2 * sbh, "sp"), T("fc1 input", 2 * sbh, "sp"),
                  T("activation input", 2 * sb * model.mlp_in_width, "tp"), T("fc2 input", 2 * sb * f, "tp")]
        if dropout:
            terms.append(T("MLP dropout mask", sbh, "sp"))
        return terms
    if saved != "tandem":
        raise ValueError(f"saved must be 'tandem' or 'megatron', got {saved!r}")
    stats = (2 if model.norm == "layernorm" else 1) * stats_bytes * sb  # mean and rstd, or rstd
    kv_kept = Fraction(1) if model.num_kv_heads != model.num_heads else kv  # repeated to a heads
    return [T("layernorm 1 input", e * sbh, "sp"), T("layernorm 1 statistics", stats, "sp"),
            T("q/k/v GEMM input", e * sbh, "none"),
            T("Q", e * sbh, "tp"), T("K", e * sbh * kv_kept, "tp"), T("V", e * sbh * kv_kept, "tp"),
            T("attention log-sum-exp", Fraction(stats_bytes * a * s * b), "tp", core=True),
            T("attention output (output projection input)", e * sbh, "tp"),
            T("layernorm 2 input", e * sbh, "sp"), T("layernorm 2 statistics", stats, "sp"),
            T("fc1 input", e * sbh, "none"),
            T("fc1 pre-activation", e * sb * model.mlp_in_width, "tp"), T("fc2 input", e * sb * f, "tp")]


def embedding_terms(model, *, seq_len: int, microbatch: int, saved: str = "tandem", dropout: bool = False,
                    tp: int = 1) -> list[ActivationTerm]:
    """What the embedding keeps per microbatch (on the first stage)."""
    sb, sbh, *_ = _sizes(model, seq_len, microbatch)
    terms = [ActivationTerm("token ids (int64)", 8 * sb, "none")]
    if saved == "megatron":
        if dropout:
            terms.append(ActivationTerm("embedding dropout mask", sbh, "sp"))
        return terms
    if model.position == "learned":
        terms.append(ActivationTerm("position ids (int64)", Fraction(8 * seq_len), "none"))
    if tp > 1:
        terms.append(ActivationTerm("vocabulary-shard mask (bool)", sb, "none"))
    return terms


def head_terms(model, *, seq_len: int, microbatch: int, saved: str = "tandem", tp: int = 1,
               dtype_bytes: int = 2, stats_bytes: int = 4) -> list[ActivationTerm]:
    """What the final norm, LM head and cross entropy keep per microbatch (last stage).

    Megatron: final LayerNorm input 2sbh, head input 2sbh, fp32 logits 4sbV/t (Korthikanti
    et al., Section 4.3: 4sbh(1 + V/h)/t with SP). tandem: the same inputs (the head's kept
    all-gathered), and the vocabulary-parallel cross entropy's fp32 tensors: the log-softmax
    (4sbV) at tp = 1, the shifted logits and their exponentials (8sbV/t) at tp > 1.
    """
    sb, sbh, *_ = _sizes(model, seq_len, microbatch)
    V, e = model.vocab_size, dtype_bytes
    T = ActivationTerm
    if saved == "megatron":
        return [T("final layernorm input", 2 * sbh, "sp"), T("LM head input", 2 * sbh, "sp"),
                T("fp32 logits (cross entropy)", 4 * sb * V, "tp")]
    stats = (2 if model.norm == "layernorm" else 1) * stats_bytes * sb
    terms = [T("final norm input", e * sbh, "sp"), T("final norm statistics", stats, "sp"),
             T("LM head input", e * sbh, "none"), T("targets (int64)", 8 * sb, "none")]
    if tp == 1:
        return terms + [T("log-softmax (fp32)", 4 * sb * V, "tp")]
    return terms + [T("shifted logits and their exponentials (fp32)", 8 * sb * V, "tp"),
                    T("sum of exponentials (fp32)", 4 * sb, "none"), T("target masks (bool)", 2 * sb, "none")]


def bytes_per_gpu(terms, tp: int, sequence_parallel: bool, *, skip_core: bool = False) -> Fraction:
    return sum((t.per_gpu(tp, sequence_parallel) for t in terms if not (skip_core and t.core)), Fraction(0))


def _check_recompute(recompute: str) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")


def layer_activation_bytes(model, *, seq_len: int, microbatch: int, tp: int = 1, sequence_parallel: bool = False,
                           recompute: str = "none", saved: str = "tandem", dropout: bool = False,
                           dtype_bytes: int = 2, stats_bytes: int = 4) -> Fraction:
    """Bytes one block keeps per microbatch on one GPU between its forward and backward.

    Full recomputation keeps only the block's input (``dtype_bytes`` * sbh, divided by tp
    with SP; Korthikanti's 2sbh); selective drops the attention core's terms.
    """
    _check_recompute(recompute)
    if recompute == "full":
        s, b, h = seq_len, microbatch, model.hidden_size
        return Fraction(dtype_bytes * s * b * h, tp if sequence_parallel else 1)
    terms = layer_terms(model, seq_len=seq_len, microbatch=microbatch, saved=saved, dropout=dropout,
                        dtype_bytes=dtype_bytes, stats_bytes=stats_bytes)
    return bytes_per_gpu(terms, tp, sequence_parallel, skip_core=recompute == "selective")


def recompute_working_bytes(model, *, seq_len: int, microbatch: int, tp: int = 1, sequence_parallel: bool = False,
                            recompute: str = "none", saved: str = "tandem", dropout: bool = False,
                            dtype_bytes: int = 2, stats_bytes: int = 4) -> Fraction:
    """Bytes rebuilt at once during a backward: one block's saved tensors under full
    recomputation, its attention core under selective, nothing without."""
    _check_recompute(recompute)
    if recompute == "none":
        return Fraction(0)
    terms = layer_terms(model, seq_len=seq_len, microbatch=microbatch, saved=saved, dropout=dropout,
                        dtype_bytes=dtype_bytes, stats_bytes=stats_bytes)
    if recompute == "selective":
        terms = [t for t in terms if t.core]
    return bytes_per_gpu(terms, tp, sequence_parallel)
