"""Time model of one pipeline stage: the durations of its F, B and W for one microbatch.

Each block's F is its forward GEMMs (gemm.py's efficiency curve), its attention core
(GEMMs when unfused; fused attention at ``attention_efficiency``, causal, so half the score
FLOPs), its elementwise kernels (memory-bound) and its tensor-parallel collectives (exposed:
they sit between the GEMMs that produce and consume their data). B is the input-gradient
GEMMs, the attention core's backward (twice its forward; fused: 2.5x, it recomputes the
scores), 1.5x the forward's elementwise traffic, the backward's collectives, and what
recomputation runs again (full: the block's forward with its collectives; selective: the
attention core's forward). W is the weight-gradient GEMMs.

TP collectives per block and microbatch, S = b s h bytes-per-element: without sequence
parallelism two all-reduces of S forward (attention and MLP outputs) and two backward
(the inputs' gradients); with it two all-gathers and two reduce-scatters each way, plus the
all-reduces of the LayerNorm and bias gradients that SP regions sum over tp (tandem).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.plan import collectives as coll
from tandem.plan.flops import block_gemms, head_gemm
from tandem.plan.gemm import gemm_time, memory_time

__all__ = ["PRECISIONS", "ActionCost", "StageCost", "stage_costs", "tp_link"]

# precision -> (GEMM dtype, bytes per activation element)
PRECISIONS = {"bf16": ("bf16", 2), "fp16": ("fp16", 2), "fp32": ("fp32", 4)}


@dataclass
class ActionCost:
    """Seconds of one action (F, B or W) of one microbatch, by what they are spent on."""

    gemm: float = 0.0
    attention: float = 0.0
    elementwise: float = 0.0
    tp_comm: float = 0.0
    recompute: float = 0.0

    @property
    def total(self) -> float:
        return self.gemm + self.attention + self.elementwise + self.tp_comm + self.recompute

    def add(self, other: "ActionCost", times: float = 1.0) -> "ActionCost":
        self.gemm += times * other.gemm
        self.attention += times * other.attention
        self.elementwise += times * other.elementwise
        self.tp_comm += times * other.tp_comm
        self.recompute += times * other.recompute
        return self


@dataclass
class StageCost:
    """One (virtual) stage: its blocks, whether it holds the embedding / head, and the
    costs of its F, B and W for one microbatch."""

    blocks: int
    first: bool
    last: bool
    F: ActionCost = field(default_factory=ActionCost)
    B: ActionCost = field(default_factory=ActionCost)
    W: ActionCost = field(default_factory=ActionCost)


def tp_link(profile, tp: int, gpus_per_node: int):
    return coll.group_link(profile, size=tp, stride=1, gpus_per_node=gpus_per_node)


def _gemm_pass(profile, gemms, dtype: str) -> tuple[float, float, float]:
    """(forward, input-gradient, weight-gradient) seconds of the linear (non-core) GEMMs."""
    fwd = bwd = wgt = 0.0
    for g in gemms:
        if g.core:
            continue
        fwd += gemm_time(profile, g.m, g.n, g.k, dtype=dtype)
        bwd += gemm_time(profile, g.m, g.k, g.n, dtype=dtype)  # dX = dY W: (m x n) @ (n x k)
        wgt += gemm_time(profile, g.n, g.k, g.m, dtype=dtype)  # dW = dY^T X: (n x m) @ (m x k)
    return fwd, bwd, wgt


def _attention(profile, framework, gemms, dtype: str) -> tuple[float, float]:
    """(forward, backward) seconds of the attention core."""
    core = [g for g in gemms if g.core]
    if framework.attention == "flash":
        rate = profile.peak(dtype) * profile.attention_efficiency
        fwd = sum(g.flops for g in core) / 2 / rate + profile.attention_overhead  # causal: half the scores
        return fwd, 2.5 * fwd
    fwd = sum(gemm_time(profile, g.m, g.n, g.k, batch=g.batch, dtype=dtype) for g in core)
    bwd = sum(gemm_time(profile, g.m, g.k, g.n, batch=g.batch, dtype=dtype)
              + gemm_time(profile, g.k, g.n, g.m, batch=g.batch, dtype=dtype) for g in core)
    return fwd, bwd


def _elementwise(profile, framework, model, *, s, b, tp, sp, e) -> float:
    """Forward seconds of one block's memory-bound kernels."""
    h, f, a = model.hidden_size, model.ffn_hidden_size, model.num_heads
    rep = s * b * h / (tp if sp else 1)
    ffn_passes = framework.ffn_passes + (0.0 if profile.fused_gelu or framework.ffn_passes else 2.0)
    nbytes = (e * (framework.replicated_passes * rep + framework.tp_passes * s * b * h / tp
                   + ffn_passes * s * b * f / tp + framework.score_passes * a * s * s * b / tp)
              + framework.mask_bytes * rep + framework.score_mask_bytes * a * s * s * b / tp)
    arithmetic = 0.0
    if not profile.fused_gelu and profile.activation_rate > 0:  # the activation, bound by its arithmetic
        arithmetic = s * b * f / tp / profile.activation_rate
    return memory_time(profile, nbytes, kernels=framework.ops_per_layer) + arithmetic


def _block_comm(model, *, s, b, tp, sp, e, link) -> tuple[float, float]:
    """(forward, backward) seconds of one block's TP collectives."""
    if tp == 1:
        return 0.0, 0.0
    S = e * s * b * model.hidden_size
    if not sp:
        one = 2 * coll.all_reduce_time(S, tp, link)
        return one, one
    one = 2 * (coll.all_gather_time(S, tp, link) + coll.reduce_scatter_time(S, tp, link))
    # the gradients of the SP region's parameters (norms; the row-parallel biases), each
    # [h], are summed over tp one by one
    count = 2 * (2 if model.norm == "layernorm" else 1) + (2 if model.bias else 0)
    return one, one + count * coll.all_reduce_time(4 * model.hidden_size, tp, link)


def _block(model, profile, framework, *, s, b, tp, sp, recompute, dtype, e, link):
    gemms = block_gemms(model, seq_len=s, microbatch=b, tp=tp)
    g_fwd, g_bwd, g_w = _gemm_pass(profile, gemms, dtype)
    a_fwd, a_bwd = _attention(profile, framework, gemms, dtype)
    ew = _elementwise(profile, framework, model, s=s, b=b, tp=tp, sp=sp, e=e)
    c_fwd, c_bwd = _block_comm(model, s=s, b=b, tp=tp, sp=sp, e=e, link=link)
    F = ActionCost(gemm=g_fwd, attention=a_fwd, elementwise=ew, tp_comm=c_fwd)
    redo = {"none": 0.0, "selective": a_fwd, "full": F.total}[recompute]
    B = ActionCost(gemm=g_bwd, attention=a_bwd, elementwise=1.5 * ew, tp_comm=c_bwd, recompute=redo)
    linears = sum(1 for g in gemms if not g.core)
    W = ActionCost(gemm=g_w, elementwise=memory_time(profile, 0, kernels=framework.wgrad_ops_per_linear * linears))
    return F, B, W


def _ends(model, profile, *, s, b, tp, sp, e, dtype, link, first, last):
    """(F, B, W) of the embedding (first stage) and final norm + head + loss (last stage)."""
    F, B, W = ActionCost(), ActionCost(), ActionCost()
    S = e * s * b * model.hidden_size
    if first:
        F.elementwise += memory_time(profile, 2 * S / (tp if sp else 1), kernels=3)  # gather rows, add
        W.elementwise += memory_time(profile, 2 * S, kernels=2)  # scatter-add into the table
        if tp > 1 and not sp:
            F.tp_comm += coll.all_reduce_time(S, tp, link)
        elif tp > 1:
            F.tp_comm += coll.reduce_scatter_time(S, tp, link)
    if last:
        g = head_gemm(model, seq_len=s, microbatch=b, tp=tp)
        F.gemm += gemm_time(profile, g.m, g.n, g.k, dtype=dtype)
        B.gemm += gemm_time(profile, g.m, g.k, g.n, dtype=dtype)
        W.gemm += gemm_time(profile, g.n, g.k, g.m, dtype=dtype)
        logits = 4 * s * b * model.vocab_size / tp  # fp32 logits: a few passes each way
        F.elementwise += memory_time(profile, 3 * logits + 2 * S, kernels=8)
        B.elementwise += memory_time(profile, 3 * logits + 3 * S, kernels=6)
        if tp > 1:
            ce = 3 * coll.all_reduce_time(4 * s * b, tp, link)  # max, sum of exp, target logit
            F.tp_comm += ce + (coll.all_gather_time(S, tp, link) if sp else 0.0)
            B.tp_comm += coll.reduce_scatter_time(S, tp, link) if sp else coll.all_reduce_time(S, tp, link)
    return F, B, W


def stage_costs(model, layout, profile, framework, *, seq_len: int, precision: str, blocks: list[int],
                gpus_per_node: int) -> list[StageCost]:
    """The StageCost of every (virtual) stage, ``blocks[s]`` blocks on stage s (stages that
    are alike share one StageCost object)."""
    dtype, e = PRECISIONS[precision]
    tp, sp, b = layout.tp, layout.sequence_parallel, layout.microbatch
    link = tp_link(profile, tp, gpus_per_node)
    F1, B1, W1 = _block(model, profile, framework, s=seq_len, b=b, tp=tp, sp=sp, recompute=layout.recompute,
                        dtype=dtype, e=e, link=link)
    made: dict[tuple, StageCost] = {}  # most stages are alike: (blocks, first, last) -> costs
    S = len(blocks)
    for s_idx, n in enumerate(blocks):
        key = (n, s_idx == 0, s_idx == S - 1)
        if key in made:
            continue
        st = made[key] = StageCost(blocks=n, first=key[1], last=key[2])
        k = profile.compute_scale
        st.F.add(F1, n * k)
        st.B.add(B1, n * k)
        st.W.add(W1, n * k)
        eF, eB, eW = _ends(model, profile, s=seq_len, b=b, tp=tp, sp=sp, e=e, dtype=dtype, link=link,
                           first=st.first, last=st.last)
        st.F.add(eF, k)
        st.B.add(eB, k)
        st.W.add(eW, k)
    return [made[(n, s_idx == 0, s_idx == S - 1)] for s_idx, n in enumerate(blocks)]
