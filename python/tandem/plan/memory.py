"""Memory model: bytes per GPU on each pipeline rank, for one layout.

    weights + gradients + optimizer states   (bytes per parameter by precision, below)
  + activations: each stage's saved bytes per microbatch (activations.py) times the
    microbatches in flight on it, counted on the schedule's action lists as
    ``tandem.pipeline.simulate`` counts them (+ at F, - at the last backward action), the
    stages of one rank added up at every point of its list
  + one block rebuilt at once by recomputation (full: its saved tensors; selective: its
    attention core)
  + the profile's reserve (CUDA context, NCCL and cuBLAS buffers, fragmentation)

Bytes per parameter (Megatron-LM, docs "Distributed Optimizer"; d = dp with the
distributed optimizer, else 1): bf16 weights with fp32 gradients 2 + 4 + 12/d (fp32 master
weights and Adam's two moments), fp16 2 + 2 + 16/d (also an fp32 gradient copy), fp32
4 + 4 + 8/d.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tandem.pipeline.ir import ActionKind

__all__ = ["BYTES_PER_PARAM", "RankMemory", "stage_params", "in_flight_events", "peak_activation_bytes",
           "rank_memory"]

BYTES_PER_PARAM = {"bf16": (2, 4, 12), "fp16": (2, 2, 16), "fp32": (4, 4, 8)}


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one GPU of pipeline rank ``rank`` (every tp and dp peer holds the same)."""

    rank: int
    params: float
    """parameters held (this GPU's shards)"""
    weights: float
    grads: float
    optimizer: float
    activations: float
    """peak of the saved activations of the microbatches in flight"""
    working: float
    """one block rebuilt by recomputation"""
    reserve: float
    peak_in_flight: int
    """most microbatches in flight on one of this rank's stages"""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.working + self.reserve


def _kv_width(model, tp: int) -> int:
    return model.kv_size // tp if model.num_kv_heads >= tp else model.kv_size


@functools.lru_cache(maxsize=4096)
def stage_params(model, tp: int, *, blocks: int, first: bool, last: bool, single_stage: bool) -> float:
    """Parameters on one GPU of a stage: ``blocks`` blocks, plus the embedding (``first``)
    and the final norm and head (``last``). A tied head on another stage than the embedding
    holds its own copy of the embedding's shard (its gradient is summed with the original)."""
    h, f, kvw = model.hidden_size, model.ffn_hidden_size, _kv_width(model, tp)
    attn = h * (h // tp) + 2 * h * kvw + (h // tp) * h
    mlp = h * (model.mlp_in_width // tp) + (f // tp) * h
    bias = (h // tp + 2 * kvw + h + model.mlp_in_width // tp + h) if model.bias else 0
    per_block = attn + mlp + bias + 2 * model.norm_params
    total = blocks * per_block
    vocab_shard = model.vocab_size // tp * h
    if first:
        total += vocab_shard + (model.max_seq_len * h if model.position == "learned" else 0)
    if last:
        total += model.norm_params
        if not model.tie_embeddings or not single_stage:
            total += vocab_shard
    return float(total)


@functools.lru_cache(maxsize=64)
def in_flight_events(kind: str, p: int, v: int, m: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per pipeline rank, its stages' (stage, +1 | -1) in list order: +1 at each F, -1 at the
    last backward action of a microbatch (W in split-backward schedules, else B)."""
    from tandem.plan.layout import Layout, build_schedule

    layout = Layout(pp=p, schedule=kind, virtual_stages=v if kind == "interleaved" else 1)
    schedule = build_schedule(layout, m)
    last = ActionKind.W if schedule.split_backward else ActionKind.B
    lists = schedule.compute_actions()
    return tuple(tuple((a.stage, 1 if a.kind is ActionKind.F else -1) for a in lists[r]
                       if a.kind is ActionKind.F or a.kind is last) for r in range(p))


def _memory_microbatches(layout, m: int) -> int:
    """A count with the same peaks as m: beyond 2p microbatches no schedule but GPipe holds
    more in flight (the warm-up of interleaved 1F1B is under 2p microbatches' chunks)."""
    p = layout.pp
    if layout.schedule == "gpipe" or m <= 2 * p:
        return m
    return 2 * p


@functools.lru_cache(maxsize=256)
def _in_flight_states(kind: str, p: int, v: int, m: int) -> tuple:
    """Per rank: (its stages, the count vectors of microbatches in flight on them that no
    other point of its list exceeds on every stage, the most on one stage). The peak of
    any non-negative weighting of the stages is reached at one of those vectors."""
    out = []
    for rank_events in in_flight_events(kind, p, v, m):
        stages = sorted({stage for stage, _ in rank_events})
        index = {s: i for i, s in enumerate(stages)}
        count = [0] * len(stages)
        seen = set()
        for stage, delta in rank_events:
            count[index[stage]] += delta
            if delta > 0:
                seen.add(tuple(count))
        maximal = [c for c in seen if not any(o != c and all(x >= y for x, y in zip(o, c)) for o in seen)]
        most = max((max(c) for c in seen), default=0)
        out.append((tuple(stages), tuple(maximal), most))
    return tuple(out)


def peak_activation_bytes(layout, m: int, stage_bytes: list[float]) -> list[tuple[float, int]]:
    """Per pipeline rank: (peak saved bytes of its stages' microbatches in flight, most
    microbatches in flight on one of its stages); ``stage_bytes[s]``: one microbatch on s."""
    kind = layout.schedule if layout.pp > 1 else "1f1b"
    v = layout.virtual_stages if kind == "interleaved" else 1
    out = []
    for stages, maximal, most in _in_flight_states(kind, layout.pp, v, _memory_microbatches(layout, m)):
        w = [stage_bytes[s] for s in stages]
        peak = max((sum(c * x for c, x in zip(vec, w)) for vec in maximal), default=0.0)
        out.append((peak, most))
    return out


def rank_memory(model, layout, profile, *, precision: str, blocks: list[int], m: int, stage_act: list[float],
                working: float) -> list[RankMemory]:
    """RankMemory of every pipeline rank; ``stage_act[s]`` is stage s's saved bytes per
    microbatch, ``working`` the bytes recomputation rebuilds at once."""
    w_b, g_b, o_b = BYTES_PER_PARAM[precision]
    d = layout.dp if layout.distributed_optimizer else 1
    S = len(blocks)
    peaks = peak_activation_bytes(layout, m, stage_act)
    kinds: dict[tuple, float] = {}  # (blocks, first, last) -> parameters: most stages are alike
    for s, n in enumerate(blocks):
        key = (n, s == 0, s == S - 1)
        if key not in kinds:
            kinds[key] = stage_params(model, layout.tp, blocks=n, first=key[1], last=key[2], single_stage=S == 1)
    out = []
    for r in range(layout.pp):
        params = sum(kinds[(blocks[s], s == 0, s == S - 1)] for s in range(r, S, layout.pp))
        act, most = peaks[r]
        out.append(RankMemory(rank=r, params=params, weights=w_b * params, grads=g_b * params,
                              optimizer=o_b * params / d, activations=act, working=working if act else 0.0,
                              reserve=profile.reserve_bytes, peak_in_flight=most))
    return out
