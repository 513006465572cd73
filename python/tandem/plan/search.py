"""The layout search behind `tandem plan`: enumerate, drop what cannot run or fit, rank.

1. Enumerate tp (dividing the GPUs of a node, unless tp may cross nodes), pp (dividing the
   rest), dp = N / (tp pp), microbatch sizes (powers of two up to 32 that divide the
   per-replica batch), schedules (1F1B; interleaved with every v in 2..8 that splits the
   blocks evenly; ZB-H1), recomputation (none, selective, full), sequence parallelism
   (tp > 1) and the distributed optimizer (dp > 1), as far as the framework has them.
2. Drop layouts that break a rule (``layout_problems``) or do not fit in memory
   (``memory_only``).
3. Rank the rest by the closed-form step time (step.py) and keep the fastest variant of
   each (tp, pp, dp, mb, schedule); simulate the best of those with
   ``tandem.pipeline.simulate`` (up to ``top`` + 1 of them, as many as a fixed budget of
   simulated actions allows, at least one) and rank them by the simulated step time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tandem.plan.estimate import Estimate, PlanError, estimate, memory_only
from tandem.plan.framework import Framework, get_framework
from tandem.plan.layout import Layout, layout_problems
from tandem.plan.model import ModelSpec
from tandem.plan.model_input import load_model
from tandem.plan.profiles import DeviceProfile, load_profile
from tandem.plan.step import simulated_counts
from tandem.plan.timing import PRECISIONS

__all__ = ["Plan", "plan", "candidate_layouts", "explain", "SIMULATION_BUDGET"]

MAX_MICROBATCH = 32
MAX_VIRTUAL_STAGES = 8
SIMULATION_BUDGET = 25_000
"""stage-microbatches (stages x microbatches, over every simulated count) the search may
simulate in all, beyond its first candidate (keeps `tandem plan` within seconds)"""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(model: ModelSpec, *, num_gpus: int, gpus_per_node: int, global_batch: int,
                      seq_len: int, framework: Framework, tp_across_nodes: bool = False):
    """Every layout the search considers (before its rules and the memory model)."""
    L = model.num_layers
    for tp in _divisors(num_gpus):
        if not tp_across_nodes and (tp > gpus_per_node or gpus_per_node % tp):
            continue
        for pp in _divisors(num_gpus // tp):
            if pp > L:
                continue
            dp = num_gpus // (tp * pp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            for mb in (d for d in _divisors(per_replica) if d <= MAX_MICROBATCH and d & (d - 1) == 0):
                m = per_replica // mb
                schedules = [("1f1b", 1)]
                if pp > 1:
                    schedules.append(("zb-h1", 1))
                    schedules += [("interleaved", v) for v in range(2, MAX_VIRTUAL_STAGES + 1)
                                  if L % (pp * v) == 0 and m % pp == 0]
                for schedule, v in schedules:
                    if pp > 1 and schedule not in framework.schedules:
                        continue
                    for recompute in framework.recompute:
                        for sp in ((False, True) if tp > 1 and framework.sequence_parallel else (False,)):
                            for dopt in ((False, True) if dp > 1 and framework.distributed_optimizer else (False,)):
                                yield Layout(tp=tp, pp=pp, dp=dp, microbatch=mb, schedule=schedule,
                                             virtual_stages=v, recompute=recompute, sequence_parallel=sp,
                                             distributed_optimizer=dopt)


@dataclass(frozen=True)
class Plan:
    """What the search found: ``ranked`` (simulated estimates, fastest first) and counts."""

    model: ModelSpec
    profile: DeviceProfile
    framework: Framework
    num_gpus: int
    gpus_per_node: int
    global_batch: int
    seq_len: int
    precision: str
    ranked: tuple[Estimate, ...]
    enumerated: int
    """layouts considered"""
    runnable: int
    """that break no rule"""
    fitting: int
    """that also fit in memory"""
    seconds: float
    """time the search took"""

    @property
    def best(self) -> Estimate:
        return self.ranked[0]


def _common(model, gpus, gpus_per_node, gpu, framework, precision):
    model, profile, framework = load_model(model), load_profile(gpu), get_framework(framework)
    if precision not in PRECISIONS:
        raise PlanError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    for name, value in (("gpus", gpus), ("gpus_per_node", gpus_per_node)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PlanError(f"{name} must be an int >= 1, got {value!r}")
    return model, profile, framework, gpus_per_node or profile.gpus_per_node


def plan(model, *, gpus: int, global_batch: int, seq_len: int, gpu="H100-SXM", gpus_per_node: int | None = None,
         precision: str = "bf16", top: int = 5, framework="tandem", tp_across_nodes: bool = False,
         budget: int = SIMULATION_BUDGET) -> Plan:
    """Search the layouts of ``model`` on ``gpus`` GPUs of kind ``gpu`` (see the module
    docstring). Raises PlanError when no layout runs and fits (saying what stood in the way)."""
    t0 = time.perf_counter()
    model, profile, framework, gpus_per_node = _common(model, gpus, gpus_per_node, gpu, framework, precision)
    if not isinstance(top, int) or top < 1:
        raise PlanError(f"top must be an int >= 1, got {top!r}")
    kw = dict(global_batch=global_batch, seq_len=seq_len, precision=precision, framework=framework)
    enumerated = runnable = 0
    groups: dict[tuple, Estimate] = {}
    smallest = None  # the layout that came closest to fitting, for the error
    for layout in candidate_layouts(model, num_gpus=gpus, gpus_per_node=gpus_per_node, global_batch=global_batch,
                                    seq_len=seq_len, framework=framework, tp_across_nodes=tp_across_nodes):
        enumerated += 1
        if layout_problems(layout, model, num_gpus=gpus, gpus_per_node=gpus_per_node, global_batch=global_batch,
                           seq_len=seq_len, framework=framework, tp_across_nodes=tp_across_nodes):
            continue
        runnable += 1
        need = max(r.total for r in memory_only(model, layout, profile, **kw))
        if need > profile.memory_bytes:
            if smallest is None or need < smallest[0]:
                smallest = (need, layout)
            continue
        est = estimate(model, layout, profile, gpus_per_node=gpus_per_node, tp_across_nodes=tp_across_nodes,
                       simulate=False, **kw)
        key = (layout.tp, layout.pp, layout.dp, layout.microbatch, layout.schedule, layout.virtual_stages)
        old = groups.get(key)
        if old is None or (est.step_time, est.max_memory) < (old.step_time, old.max_memory):
            groups[key] = est
    if not groups:
        detail = (f"; the closest, {smallest[1]}, needs {smallest[0] / 1e9:.1f} GB of {profile.memory_bytes / 1e9:.0f}"
                  if smallest else "")
        raise PlanError(f"no layout of {model.name} on {gpus} x {profile.name} runs and fits in memory "
                        f"({enumerated} considered, {runnable} break no rule){detail}")
    order = sorted(groups.values(), key=lambda e: (e.step_time, e.max_memory))
    ranked, spent = [], 0
    for est in order:
        layout = est.layout
        cost = layout.num_stages * sum(simulated_counts(layout, est.num_microbatches))
        if ranked and (len(ranked) >= top + 1 or spent + cost > budget):
            break
        spent += cost
        ranked.append(estimate(model, layout, profile, gpus_per_node=gpus_per_node, tp_across_nodes=tp_across_nodes,
                               breakdown=False, **kw))
    ranked.sort(key=lambda e: (e.step_time, e.max_memory))
    return Plan(model=model, profile=profile, framework=framework, num_gpus=gpus, gpus_per_node=gpus_per_node,
                global_batch=global_batch, seq_len=seq_len, precision=precision, ranked=tuple(ranked[:top]),
                enumerated=enumerated, runnable=runnable, fitting=len(groups), seconds=time.perf_counter() - t0)


def explain(model, layout, *, gpus: int | None = None, global_batch: int, seq_len: int, gpu="H100-SXM",
            gpus_per_node: int | None = None, precision: str = "bf16", framework="tandem",
            tp_across_nodes: bool = False) -> list[str]:
    """Why the search drops ``layout`` (its broken rules, or its memory against the
    device's), or an empty list when it runs and fits."""
    if isinstance(layout, str):
        layout = Layout.parse(layout)
    model, profile, framework, gpus_per_node = _common(model, gpus, gpus_per_node, gpu, framework, precision)
    gpus = gpus or layout.gpus
    why = layout_problems(layout, model, num_gpus=gpus, gpus_per_node=gpus_per_node, global_batch=global_batch,
                          seq_len=seq_len, framework=framework, tp_across_nodes=tp_across_nodes)
    if why:
        return why
    mem = memory_only(model, layout, profile, global_batch=global_batch, seq_len=seq_len, precision=precision,
                      framework=framework)
    worst = max(mem, key=lambda r: r.total)
    if worst.total <= profile.memory_bytes:
        return []
    G = 1e9
    return [f"pipeline rank {worst.rank} needs {worst.total / G:.1f} GB of the {profile.memory_bytes / G:.0f} GB "
            f"of a {profile.name}: weights {worst.weights / G:.1f}, gradients {worst.grads / G:.1f}, optimizer "
            f"{worst.optimizer / G:.1f}, activations {worst.activations / G:.1f} ({worst.peak_in_flight} "
            f"microbatches in flight), recomputation {worst.working / G:.1f}, reserve {worst.reserve / G:.1f}"]
