"""The pipeline part of a step: ``tandem.pipeline.simulate`` run on the stages' costs.

The planner simulates the layout's schedule with each stage's F, B and W durations and the
stage-to-stage message time (``simulate`` lowers it with those costs: every receive is
posted before its data exists, as the runtime's lists post them when stage costs are
even). For many microbatches it simulates two counts, m1 and m2, and extends the makespan
(and each rank's end) linearly to m: once the pipeline is full every further microbatch
adds the same time (the steady state repeats). m1, m2 = p, 2p, and 2p, 3p for ZB-H1,
whose steady state settles later when messages are slow; tests check the extension
against full simulations.

Two things a dataflow of fixed durations misses are optional: ``sharing`` (host.py: ranks
that share CPU cores, each action stretched by how many compute beside it) and ``jitter``:
the spread of each action's time from step to step (the standard deviation of its
logarithm). A pipeline waits for the later of two producers, so spread lengthens the step
and widens the bubble: on the 2-core VM, replaying each measured step's own durations gave
its measured bubble (0.214 vs 0.221), replaying the median durations 0.198. With jitter
the step is simulated ``JITTER_SAMPLES`` times with every action's time multiplied by
exp(N(0, jitter^2)) (a fixed seed: the estimate is deterministic), and the makespan and
bubble are the medians, as measured steps are summarised.
"""

from __future__ import annotations

import functools
import math
import random
import statistics
from dataclasses import dataclass

from tandem.pipeline import Action, Costs, SimulationResult, simulate

__all__ = ["StepSimulation", "simulate_step", "schedule_of", "closed_form_makespan", "closed_form_step",
           "JITTER_SAMPLES"]

JITTER_SAMPLES = 31


@functools.lru_cache(maxsize=64)
def _schedule(kind: str, p: int, v: int, m: int):
    from tandem.plan.layout import Layout, build_schedule

    return build_schedule(Layout(pp=p, schedule=kind, virtual_stages=v if kind == "interleaved" else 1), m)


def schedule_of(layout, m: int):
    """The tandem.pipeline Schedule of ``layout`` with ``m`` microbatches (cached)."""
    v = layout.virtual_stages if layout.schedule == "interleaved" else 1
    return _schedule(layout.schedule if layout.pp > 1 else "1f1b", layout.pp, v, m)


def _extension_points(layout) -> tuple[int, int]:
    p = layout.pp
    return (2 * p, 3 * p) if layout.schedule == "zb-h1" else (p, 2 * p)


def simulated_counts(layout, m: int) -> tuple[int, ...]:
    """The microbatch counts ``simulate_step`` simulates for ``m``."""
    m1, m2 = _extension_points(layout)
    return (m,) if m <= m2 else (m1, m2)


@dataclass(frozen=True)
class StepSimulation:
    """The simulated pipeline of one step."""

    makespan: float
    """seconds from the first F to the last backward action"""
    bubble: float
    """idle share of rank time over the makespan"""
    rank_end: tuple[float, ...]
    """when each pipeline rank finishes its last action"""
    simulated: tuple[int, ...]
    """the microbatch counts simulated (one: exact; two: extended linearly; none: the
    closed form of ``closed_form_makespan``, for ranking only)"""
    result: SimulationResult | None
    """the simulation at the largest simulated count (for pictures)"""
    work: float = 0.0
    """rank-seconds of F, B and W over all pipeline ranks (stretched when ranks share cores)"""


def _compute(res) -> dict[Action, float]:
    return {Action(r.stage, r.kind, r.microbatch): r.end_s - r.start_s for r in res.timeline if r.kind.is_compute}


def _ends(res, p: int) -> list[float]:
    start = min(r.start_s for r in res.timeline if r.kind.is_compute)
    ends = [0.0] * p
    for r in res.timeline:
        if r.kind.is_compute:
            ends[r.rank] = max(ends[r.rank], r.end_s - start)
    return ends


def _run(layout, m: int, costs: dict[int, Costs], sharing, jitter: float):
    """(makespan, each rank's end, compute rank-seconds, bubble, the simulation) of ``m``
    microbatches."""
    schedule = schedule_of(layout, m)
    res = simulate(schedule, costs)
    if sharing is not None:
        res = simulate(schedule, costs, durations=sharing(schedule, costs, res))
    durations = _compute(res)
    makespan, work, bubble = res.makespan, sum(durations.values()), res.bubble_fraction
    ends = _ends(res, layout.pp)
    if jitter > 0:
        rng = random.Random(0)
        spans, works, bubbles = [], [], []
        for _ in range(JITTER_SAMPLES):
            noisy = {a: d * math.exp(rng.gauss(0.0, jitter)) for a, d in durations.items()}
            r = simulate(schedule, costs, durations=noisy)
            spans.append(r.makespan)
            works.append(sum(noisy.values()))
            bubbles.append(r.bubble_fraction)
        scale = statistics.median(spans) / makespan
        makespan, work, bubble = scale * makespan, statistics.median(works), statistics.median(bubbles)
        ends = [scale * e for e in ends]
    return makespan, ends, work, bubble, res


def simulate_step(layout, m: int, costs: dict[int, Costs], *, sharing=None, jitter: float = 0.0) -> StepSimulation:
    """Simulate ``layout``'s schedule with ``m`` microbatches and per-stage ``costs`` (each
    action's time alone); ``sharing``: a host.Sharing, or None; ``jitter``: see above."""
    p = layout.pp
    m1, m2 = _extension_points(layout)
    if m <= m2:
        makespan, ends, work, bubble, res = _run(layout, m, costs, sharing, jitter)
        counts = (m,)
    else:
        t1, e1, w1, _, _ = _run(layout, m1, costs, sharing, jitter)
        t2, e2, w2, _, res = _run(layout, m2, costs, sharing, jitter)
        scale = (m - m1) / (m2 - m1)
        makespan = t1 + scale * (t2 - t1)
        ends = [a + scale * (b - a) for a, b in zip(e1, e2)]
        work = w1 + scale * (w2 - w1)
        bubble = max(0.0, 1.0 - work / (p * makespan))  # (rounding can put an empty bubble below 0)
        counts = (m1, m2)
    return StepSimulation(makespan=makespan, bubble=max(0.0, bubble), rank_end=tuple(ends), simulated=counts,
                          result=res, work=work)


def closed_form_step(layout, m: int, stage_work: list[float], comm: float) -> StepSimulation:
    """``closed_form_makespan`` as a StepSimulation (nothing simulated)."""
    makespan = closed_form_makespan(layout, m, stage_work, comm)
    work = m * sum(stage_work)
    return StepSimulation(makespan=makespan, bubble=max(0.0, 1.0 - work / (layout.pp * makespan)),
                          rank_end=(makespan,) * layout.pp, simulated=(), result=None, work=work)


def closed_form_makespan(layout, m: int, stage_work: list[float], comm: float) -> float:
    """A quick estimate for ranking many layouts before simulating the best: m times the
    busiest rank's work per microbatch (``stage_work[s]``: F + B + W of stage s), plus the
    fill and drain of the pipeline: (p - 1) stages' work (a third of it for ZB-H1, whose
    W fills the drain) and two messages per stage boundary."""
    p = layout.pp
    per_rank = [0.0] * p
    for s, w in enumerate(stage_work):
        per_rank[s % p] += w
    fill = (1.0 / 3.0 if layout.schedule == "zb-h1" else 1.0) * sum(stage_work) / len(stage_work)
    return m * max(per_rank) + (p - 1) * (fill + 2 * comm)
