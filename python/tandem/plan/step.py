"""The pipeline part of a step: ``tandem.pipeline.simulate`` run on the stages' costs.

The planner simulates the layout's schedule with each stage's F, B and W durations and the
stage-to-stage message time (``simulate`` lowers it with those costs: every receive is
posted before its data exists, as the runtime's lists post them when stage costs are
even). For many microbatches it simulates two counts, m1 and m2, and extends the makespan
(and each rank's end) linearly to m: once the pipeline is full every further microbatch
adds the same time (the steady state repeats). m1, m2 = p, 2p, and 2p, 3p for ZB-H1,
whose steady state settles later when messages are slow; tests check the extension
against full simulations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tandem.pipeline import Costs, SimulationResult, simulate

__all__ = ["StepSimulation", "simulate_step", "schedule_of", "closed_form_makespan", "closed_form_step"]


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


def _run(layout, m: int, costs: dict[int, Costs]) -> tuple[float, list[float], SimulationResult]:
    res = simulate(schedule_of(layout, m), costs)
    start = min(r.start_s for r in res.timeline if r.kind.is_compute)
    ends = [0.0] * layout.pp
    for r in res.timeline:
        if r.kind.is_compute:
            ends[r.rank] = max(ends[r.rank], r.end_s - start)
    return res.makespan, ends, res


def simulate_step(layout, m: int, costs: dict[int, Costs]) -> StepSimulation:
    """Simulate ``layout``'s schedule with ``m`` microbatches and per-stage ``costs``."""
    p = layout.pp
    work = m * sum(c.F + c.B + c.W for c in costs.values())  # every stage's compute, all ranks
    m1, m2 = _extension_points(layout)
    if m <= m2:
        makespan, ends, res = _run(layout, m, costs)
        counts = (m,)
    else:
        t1, e1, _ = _run(layout, m1, costs)
        t2, e2, res = _run(layout, m2, costs)
        scale = (m - m1) / (m2 - m1)
        makespan = t1 + scale * (t2 - t1)
        ends = [a + scale * (b - a) for a, b in zip(e1, e2)]
        counts = (m1, m2)
    bubble = max(0.0, 1.0 - work / (p * makespan))  # (rounding can put an empty bubble below 0)
    return StepSimulation(makespan=makespan, bubble=bubble, rank_end=tuple(ends), simulated=counts, result=res)


def closed_form_step(layout, m: int, stage_work: list[float], comm: float) -> StepSimulation:
    """``closed_form_makespan`` as a StepSimulation (nothing simulated)."""
    makespan = closed_form_makespan(layout, m, stage_work, comm)
    return StepSimulation(makespan=makespan, bubble=max(0.0, 1.0 - m * sum(stage_work) / (layout.pp * makespan)),
                          rank_end=(makespan,) * layout.pp, simulated=(), result=None)


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
