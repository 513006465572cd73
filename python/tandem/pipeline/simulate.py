"""Dry-run a pipeline schedule without any process group.

Semantics modelled (the ones the runtime implements):

- Each rank runs its list in order, one action at a time.
- ``RECV_x`` posts a receive (an irecv): it never blocks, and holds its rank for the
  host time of posting, ``costs.post_recv`` (0 by default).
- ``SEND_x`` blocks until its producer (F or B on the same rank) has finished and the peer
  has *posted* the matching receive (rendezvous, as a blocking send without buffering);
  it holds its rank for ``costs.post_send`` (0 by default), and the transfer runs beside
  compute and lands ``max(costs.comm, costs.post_send)`` after the send started.
- F, B and W start when the rank is free and their inputs are there: the previous stage's
  output (local, or landed through a posted receive), the stage's own F before its B, the
  next stage's input gradient before B, B before W.

A send whose receive is posted late therefore stalls its rank, and lists in which every
rank waits on another are reported as a ``DeadlockError`` naming each rank's step.
``lower`` posts every receive before the producer of its data starts, so lowered
schedules never deadlock under any costs, and never block on a send under the costs they
were lowered with when posting is free. Lowering places receives with free posting: when
posting a receive takes a large share of a compute action, a send may wait for its
receive to be posted (at the posting costs bench_pipeline measures, none does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from tandem.pipeline.events import Costs, CostsLike, _execute, _gc_paused
from tandem.pipeline.ir import Action, ActionKind, TimelineRecord
from tandem.pipeline.lower import _lower

__all__ = ["Costs", "SimulationResult", "simulate", "bubble_fraction"]

K = ActionKind


@dataclass(frozen=True)
class SimulationResult:
    """What a dry run found.

    ``bubble_fraction`` is 1 - (compute time of all ranks) / (num_ranks * makespan), the
    share of rank-time spent idle between the first action and the last.
    ``peak_in_flight[stage]`` is the most microbatches that had started F on that stage
    without finishing their last backward action (W when split, else B).
    """

    timeline: tuple[TimelineRecord, ...]
    makespan: float
    bubble_fraction: float
    peak_in_flight: dict[int, int]
    num_ranks: int


def simulate(schedule, costs: CostsLike = None, *,
             durations: Mapping[Action, float] | None = None) -> SimulationResult:
    """Dry-run ``schedule`` and return its timeline, bubble and peak in-flight counts.

    ``schedule``: lowered action lists ``{rank: [Action]}`` (with sends and receives), or a
    ``Schedule`` / compute-only lists, which are lowered first with the same costs.
    ``costs``: one ``Costs`` for every stage, a ``{stage: Costs}`` mapping, or None for unit
    costs (F = B = W = 1, so a full backward costs 2). ``durations``: the time of single
    actions, in place of their stage's costs (an F/B/W's compute, a SEND's or RECV's
    posting), e.g. each action's measured time, to replay a measured step (host timelines:
    a SEND record spans its posting; ``comm`` still comes from ``costs``). Raises ``DeadlockError`` naming the blocked step of each rank, or
    ``ScheduleError`` for malformed lists.
    """
    durations = _check_durations(durations)
    with _gc_paused():  # many small objects, none cyclic: collecting only costs time
        lowered, (layout, _, split) = _lower(schedule, costs)  # checked (or built) valid
        records = _execute(lowered, layout, costs, split, explicit_comm=True, durations=durations)
    compute = [rec for rec in records if rec.kind.is_compute]
    makespan = max(rec.end_s for rec in compute) - min(rec.start_s for rec in compute)
    return SimulationResult(timeline=tuple(records), makespan=makespan,
                            bubble_fraction=bubble_fraction(records, layout.num_ranks),
                            peak_in_flight=_peak_in_flight(lowered, split),
                            num_ranks=layout.num_ranks)


def _check_durations(durations) -> dict:
    if durations is None:
        return {}
    if not isinstance(durations, Mapping):
        raise TypeError(f"durations must map Action -> seconds, got {type(durations).__name__}")
    for a, d in durations.items():
        if not isinstance(a, Action):
            raise TypeError(f"durations: keys must be Actions, got {a!r}")
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise ValueError(f"durations[{a}] must be a finite number >= 0, got {d!r}")
    return dict(durations)


def bubble_fraction(timeline: Sequence[TimelineRecord], num_ranks: int | None = None) -> float:
    """Idle share of rank-time between the first F/B/W and the last one:
    1 - (compute time of all ranks) / (num_ranks * makespan).

    Works on simulated and measured timelines alike; ``num_ranks`` defaults to the number
    of ranks that appear in the timeline.
    """
    compute = [rec for rec in timeline if rec.kind.is_compute]
    if not compute:
        raise ValueError("the timeline holds no F, B or W record")
    makespan = max(rec.end_s for rec in compute) - min(rec.start_s for rec in compute)
    if num_ranks is None:
        num_ranks = len({rec.rank for rec in compute})
    if makespan <= 0:
        raise ValueError("the timeline's F/B/W records span no time")
    busy = sum(rec.end_s - rec.start_s for rec in compute)
    return 1.0 - busy / (num_ranks * makespan)


def _peak_in_flight(lists: Mapping[int, Sequence[Action]], split: bool) -> dict[int, int]:
    last = K.W if split else K.B
    count: dict[int, int] = {}
    peak: dict[int, int] = {}
    for lst in lists.values():
        for a in lst:
            if a.kind is K.F:
                count[a.stage] = count.get(a.stage, 0) + 1
                peak[a.stage] = max(peak.get(a.stage, 0), count[a.stage])
            elif a.kind is last:
                count[a.stage] -= 1
    return dict(sorted(peak.items()))
