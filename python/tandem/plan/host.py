"""Ranks that share a host's CPU cores: processor sharing, action by action.

On a CPU profile with more ranks per host than cores (``cores_per_node``), the ranks that
compute at the same time share the cores. With c of them computing on k < c cores, an
action takes 1 + e (c/k - 1) times its time alone, e the profile's ``sharing_efficiency``
(1: the cores are shared evenly; a CPU rank blocks in its collectives and so leaves its
core to the others part of the time: calibrate.py measures e). How many compute during an
action comes from the simulated step itself: n(t) pipeline ranks compute at time t, each
standing for tp x dp processes, and c is n(t) tp dp averaged over the action. So the
actions of the pipeline's fill and drain, which run while other ranks wait, run faster
than those of the steady state, as measured: on the 2-core VM a tp=2 x pp=2 job's first
forward took 11.8 ms, the steady state's 17.5-18.3 ms (2026-12-07). The durations are the
fixed point of "simulate, recount c, stretch" (damped). GPUs (one per rank) are never
shared.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tandem.pipeline import Action, simulate

__all__ = ["Sharing", "sharing_ranks", "sharing_of"]


def sharing_ranks(profile, layout, gpus_per_node: int) -> int:
    """Ranks of one host that share its cores (0 when they do not share: GPUs)."""
    if profile.kind != "cpu" or not profile.cores_per_node:
        return 0
    ranks = min(layout.gpus, gpus_per_node)
    return ranks if ranks > profile.cores_per_node else 0


def sharing_of(profile, layout, gpus_per_node: int) -> "Sharing | None":
    """The Sharing of ``layout``'s ranks on ``profile``'s hosts, or None when they do not share."""
    ranks = sharing_ranks(profile, layout, gpus_per_node)
    if not ranks:
        return None
    return Sharing(cores=profile.cores_per_node, ranks=ranks, per_pipeline_rank=layout.tp * layout.dp,
                   efficiency=profile.sharing_efficiency)


@dataclass(frozen=True)
class Sharing:
    """``ranks`` processes of a host on ``cores`` cores; each pipeline rank stands for
    ``per_pipeline_rank`` of them (tp x dp)."""

    cores: int
    ranks: int
    per_pipeline_rank: int
    efficiency: float = 1.0
    iterations: int = 40

    def stretch(self, computing: float) -> float:
        """How much longer an action takes with ``computing`` pipeline ranks (itself included)
        computing on average over it."""
        running = min(computing * self.per_pipeline_rank, self.ranks)
        return 1.0 + self.efficiency * max(0.0, running / self.cores - 1.0)

    def __call__(self, schedule, costs, first) -> dict[Action, float]:
        """The durations of ``schedule``'s compute actions under sharing; ``first``: its
        simulation with ``costs`` (every action at its time alone)."""
        alone = {_action(r): r.end_s - r.start_s for r in first.timeline if r.kind.is_compute}
        durations, result = dict(alone), first
        for _ in range(self.iterations):
            load = _mean_load(result.timeline)
            new = {a: 0.5 * (d + alone[a] * self.stretch(load[a])) for a, d in durations.items()}
            change = max(abs(new[a] / durations[a] - 1.0) for a in new)
            durations = new
            if change < 1e-4:
                break
            result = simulate(schedule, costs, durations=durations)
        return durations


def _action(rec) -> Action:
    return Action(rec.stage, rec.kind, rec.microbatch)


def _mean_load(timeline) -> dict[Action, float]:
    """For every compute record: the mean number of ranks computing over its span (itself
    included): the integral of n(t) over the span, from a prefix integral of the step
    function n(t)."""
    compute = [r for r in timeline if r.kind.is_compute and r.end_s > r.start_s]
    events = sorted([(r.start_s, 1) for r in compute] + [(r.end_s, -1) for r in compute])
    times, integral, level = [], [], []  # breakpoints, the integral up to each, n(t) after it
    n, total, last = 0, 0.0, None
    for t, delta in events:
        if last is not None:
            total += n * (t - last)
        n, last = n + delta, t
        if times and times[-1] == t:
            integral[-1], level[-1] = total, n
        else:
            times.append(t)
            integral.append(total)
            level.append(n)

    def upto(t: float) -> float:
        j = bisect.bisect_right(times, t) - 1
        return integral[j] + level[j] * (t - times[j])

    return {_action(r): (upto(r.end_s) - upto(r.start_s)) / (r.end_s - r.start_s) for r in compute}
