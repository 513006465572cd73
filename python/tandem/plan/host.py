"""Ranks that share a host's CPU cores: processor sharing, seen by the work.

On a CPU profile with more ranks per host than cores (``cores_per_node``), the ranks that
compute at the same time share the cores: with c of them running on k cores, each runs at
k/c of a core. How many run at once comes from the simulated step itself: n(t) pipeline
ranks compute at time t, each standing for tp x dp processes, and the work sees the
work-weighted mean c = tp dp (integral of n(t)^2 dt) / (integral of n(t) dt) (work done
when many compute is slowed the most). Every action is stretched by s = max(1, c/k), its TP collectives too: on a CPU a
collective's latency is host work (gloo's threads on both ends), and a gloo all-reduce of
4 bytes between two ranks took 350-500 us with one pair running and 580-740 us with both
pairs of a tp=2 x pp=2 job on 2 cores (2026-12-07). The pipeline is simulated again with
the stretched costs, c recounted, until s settles. GPUs (one per rank) are never
shared: s = 1.
"""

from __future__ import annotations

from tandem.pipeline import Costs

__all__ = ["sharing_ranks", "stretched_costs", "sharing_slowdown"]


def sharing_ranks(profile, layout, gpus_per_node: int) -> int:
    """Ranks of one host that share its cores (0 when they do not share: GPUs)."""
    if profile.kind != "cpu" or not profile.cores_per_node:
        return 0
    ranks = min(layout.gpus, gpus_per_node)
    return ranks if ranks > profile.cores_per_node else 0


def stretched_costs(stages, p2p: float, s: float) -> dict[int, Costs]:
    """Per-stage simulator costs with every action stretched by ``s`` (its TP collectives too)."""
    out = {}
    for i, st in enumerate(stages):
        F, B, W = (s * a.total for a in (st.F, st.B, st.W))
        out[i] = Costs(F=F, B=B, W=W, comm=p2p)
    return out


def _work_concurrency(result) -> float:
    """Integral of n(t)^2 over integral of n(t): n(t) pipeline ranks computing at time t."""
    events = []
    for rec in result.timeline:
        if rec.kind.is_compute and rec.end_s > rec.start_s:
            events += [(rec.start_s, 1), (rec.end_s, -1)]
    events.sort()
    n, last, square, linear = 0, None, 0.0, 0.0
    for t, delta in events:
        if last is not None and n:
            square += n * n * (t - last)
            linear += n * (t - last)
        n, last = n + delta, t
    return square / linear if linear else 1.0


def sharing_slowdown(layout, m: int, stages, p2p: float, cores: int, ranks: int, simulate_step,
                     iterations: int = 8):
    """(s, the simulated step at s): the fixed point of the model above."""
    per_pipeline_rank = layout.tp * layout.dp
    s, sim = 1.0, None
    for _ in range(iterations):
        sim = simulate_step(layout, m, stretched_costs(stages, p2p, s))
        running = min(_work_concurrency(sim.result) * per_pipeline_rank, ranks)
        target = max(1.0, running / cores)
        if abs(target - s) <= 1e-3 * s:
            s = target
            break
        s = 0.5 * (s + target)
    sim = simulate_step(layout, m, stretched_costs(stages, p2p, s))
    return s, sim
