"""Ranks that share a host's CPU cores: processor sharing, as a mean field.

On a CPU profile with more ranks per host than cores (``cores_per_node``), the ranks that
compute at the same time share the cores: with c of them running on k cores, each runs at
k/c of a core. The planner does not know at each instant how many run, so it uses the
mean: c = (rank-seconds of compute in the step) / (step time), found as a fixed point. It
simulates the pipeline with every action's compute stretched by s = max(1, c/k)
(communication is waiting and is not stretched), recounts c from the simulated step, and
repeats until s settles. GPUs (one per rank) are never shared: s = 1.
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
    """Per-stage simulator costs with compute stretched by ``s`` (TP collectives as they are)."""
    out = {}
    for i, st in enumerate(stages):
        F, B, W = (a.total + (s - 1.0) * (a.total - a.tp_comm) for a in (st.F, st.B, st.W))
        out[i] = Costs(F=F, B=B, W=W, comm=p2p)
    return out


def sharing_slowdown(layout, m: int, stages, p2p: float, cores: int, ranks: int, simulate_step,
                     iterations: int = 8):
    """(s, the simulated step at s): the fixed point of the mean-field model above."""
    per_rank = sum(a.total - a.tp_comm for st in stages for a in (st.F, st.B, st.W))  # one microbatch, all stages
    busy = m * per_rank * layout.tp * layout.dp  # rank-seconds of compute at s = 1, every stage's tp x dp ranks
    s, sim = 1.0, None
    for _ in range(iterations):
        sim = simulate_step(layout, m, stretched_costs(stages, p2p, s))
        running = busy * s / sim.makespan
        target = max(1.0, min(running, ranks) / cores)
        if abs(target - s) <= 1e-3 * s:
            s = target
            break
        s = 0.5 * (s + target)
    sim = simulate_step(layout, m, stretched_costs(stages, p2p, s))
    return s, sim
