"""estimate(): the memory and time of one layout, broken down.

Step time = the simulated pipeline (step.py, on the stages' F/B/W from timing.py and the
stage-to-stage message time) + the exposed data-parallel gradient reduction of each rank
after its last backward + the optimizer step (memory-bound: every parameter's fp32
master weight, two Adam moments and gradient read and written; 34 bytes per parameter in
bf16/fp16, 32 in fp32) + with the distributed optimizer, the all-gather of the updated
parameters.

DP reduction: an all-reduce of the rank's gradients over dp (a reduce-scatter with the
distributed optimizer), on NVLink when the dp group fits a node, else the network. When
the framework overlaps it, the buckets are reduced while the last microbatch's backward
runs on the rank, so what exceeds that backward is exposed (at least the last bucket,
one block's share). The gradient of tied embeddings is summed between the first and last
stage (an all-reduce over 2 ranks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from tandem.pipeline import Costs
from tandem.plan import collectives as coll
from tandem.plan.activations import (bytes_per_gpu, embedding_terms, head_terms, layer_activation_bytes,
                                     recompute_working_bytes)
from tandem.plan.flops import hardware_flops, model_flops
from tandem.plan.framework import Framework, get_framework
from tandem.plan.gemm import memory_time
from tandem.plan.host import sharing_of
from tandem.plan.layout import Layout, layout_problems, stage_blocks
from tandem.plan.memory import BYTES_PER_PARAM, RankMemory, rank_memory
from tandem.plan.model import ModelSpec
from tandem.plan.model_input import load_model
from tandem.plan.profiles import DeviceProfile, load_profile
from tandem.plan.step import StepSimulation, closed_form_step, simulate_step
from tandem.plan.timing import PRECISIONS, StageCost, stage_costs

__all__ = ["Estimate", "estimate", "memory_only", "PlanError"]

OPTIMIZER_BYTES = {"bf16": 34, "fp16": 34, "fp32": 32}


class PlanError(ValueError):
    """A layout that cannot run, a model or a profile that does not make sense."""


@dataclass(frozen=True)
class Estimate:
    """Memory and time of one layout (see the module docstring); seconds and bytes."""

    model: ModelSpec
    layout: Layout
    profile: DeviceProfile
    framework: Framework
    global_batch: int
    seq_len: int
    precision: str
    gpus_per_node: int
    num_microbatches: int
    memory: tuple[RankMemory, ...]
    stages: tuple[StageCost, ...]
    p2p_time: float
    """one stage-to-stage message"""
    pipeline: StepSimulation
    pipeline_no_comm: StepSimulation | None
    """the same pipeline with free messages (to tell exposed PP communication from bubble)"""
    dp_exposed: float
    """the slowest rank's data-parallel communication after its last backward"""
    dp_total: float
    optimizer_time: float
    step_time: float
    slowdown: float = 1.0
    """how much slower the ranks compute, on average over their work, because they share a
    host's cores (host.py)"""

    @property
    def num_gpus(self) -> int:
        return self.layout.gpus

    @property
    def capacity(self) -> float:
        return self.profile.memory_bytes

    @property
    def max_memory(self) -> float:
        return max(r.total for r in self.memory)

    @property
    def fits(self) -> bool:
        return self.max_memory <= self.capacity

    @property
    def busiest_rank(self) -> int:
        work = [0.0] * self.layout.pp
        for s, st in enumerate(self.stages):
            work[s % self.layout.pp] += st.F.total + st.B.total + st.W.total
        return max(range(self.layout.pp), key=work.__getitem__)

    def _rank_sum(self, attr: str) -> float:
        r, m = self.busiest_rank, self.num_microbatches
        return m * sum(getattr(a, attr) for s, st in enumerate(self.stages) if s % self.layout.pp == r
                       for a in (st.F, st.B, st.W))

    @property
    def compute_time(self) -> float:
        """The busiest rank's F/B/W time, TP communication excluded (recomputation included)."""
        return self.slowdown * sum(self._rank_sum(k) for k in ("gemm", "attention", "elementwise", "recompute"))

    @property
    def tp_exposed(self) -> float:
        return self._rank_sum("tp_comm")

    @property
    def pp_exposed(self) -> float:
        if self.pipeline_no_comm is None:
            return 0.0
        return max(0.0, self.pipeline.makespan - self.pipeline_no_comm.makespan)

    @property
    def bubble_time(self) -> float:
        """The busiest rank's idle time inside the pipeline, exposed PP messages excluded."""
        return max(0.0, self.pipeline.makespan - self.pp_exposed - self.compute_time - self.tp_exposed)

    @property
    def bubble(self) -> float:
        return self.pipeline.bubble

    @property
    def tokens_per_s(self) -> float:
        return self.global_batch * self.seq_len / self.step_time

    @property
    def hardware_flops(self) -> float:
        return hardware_flops(self.model, seq_len=self.seq_len, sequences=self.global_batch,
                              recompute=self.layout.recompute)

    @property
    def model_flops(self) -> float:
        return model_flops(self.model, seq_len=self.seq_len, sequences=self.global_batch)

    @property
    def tflops_per_gpu(self) -> float:
        """Achieved TFLOP/s per GPU, counting recomputation (the hardware count)."""
        return self.hardware_flops / (self.step_time * self.num_gpus) / 1e12

    @property
    def model_tflops_per_gpu(self) -> float:
        return self.model_flops / (self.step_time * self.num_gpus) / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: the model count over the profile's peak."""
        peak = self.profile.peak(PRECISIONS[self.precision][0])
        return self.model_flops / (self.step_time * self.num_gpus * peak)


def _check(model, layout, *, num_gpus, gpus_per_node, global_batch, seq_len, precision, framework,
           tp_across_nodes) -> None:
    if precision not in PRECISIONS:
        raise PlanError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    problems = layout_problems(layout, model, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                               global_batch=global_batch, seq_len=seq_len, framework=framework,
                               tp_across_nodes=tp_across_nodes)
    if problems:
        raise PlanError(f"layout {layout} cannot run {model.name}: " + "; ".join(problems))


@functools.lru_cache(maxsize=4096)
def _activation_parts(model, framework, seq_len: int, precision: str, tp: int, sp: bool, recompute: str,
                      microbatch: int) -> tuple[float, float, float, float]:
    """(one block's, the embedding's, the head's saved bytes per microbatch, the bytes
    recomputation rebuilds at once) on one GPU."""
    e = PRECISIONS[precision][1]
    common = dict(seq_len=seq_len, microbatch=microbatch, saved=framework.saved, dropout=framework.dropout)
    block = layer_activation_bytes(model, tp=tp, sequence_parallel=sp, recompute=recompute, dtype_bytes=e, **common)
    emb = bytes_per_gpu(embedding_terms(model, tp=tp, **common), tp, sp)
    head = bytes_per_gpu(head_terms(model, tp=tp, dtype_bytes=e, seq_len=seq_len, microbatch=microbatch,
                                    saved=framework.saved), tp, sp)
    working = recompute_working_bytes(model, tp=tp, sequence_parallel=sp, recompute=recompute, dtype_bytes=e,
                                      **common)
    return float(block), float(emb), float(head), float(working)


def _stage_activation(model, layout, framework, *, seq_len, precision, blocks) -> tuple[list[float], float]:
    """(saved bytes per microbatch of each stage, bytes recomputation rebuilds at once)."""
    block, emb, head, working = _activation_parts(model, framework, seq_len, precision, layout.tp,
                                                  layout.sequence_parallel, layout.recompute, layout.microbatch)
    S = len(blocks)
    acts = [n * block + (emb if s == 0 else 0.0) + (head if s == S - 1 else 0.0) for s, n in enumerate(blocks)]
    return acts, working


def memory_only(model, layout: Layout, profile, *, global_batch: int, seq_len: int, precision: str = "bf16",
                framework="tandem") -> list[RankMemory]:
    """The memory model alone (no time): what the search uses to drop layouts."""
    framework = get_framework(framework)
    blocks = stage_blocks(model.num_layers, layout.num_stages)
    acts, working = _stage_activation(model, layout, framework, seq_len=seq_len, precision=precision, blocks=blocks)
    return rank_memory(model, layout, profile, precision=precision, blocks=blocks,
                       m=layout.num_microbatches(global_batch), stage_act=acts, working=working)


def _p2p(model, layout, profile, framework, *, seq_len, precision, gpus_per_node) -> float:
    if layout.pp == 1:
        return 0.0
    e = PRECISIONS[precision][1]
    S = e * seq_len * layout.microbatch * model.hidden_size
    link = coll.group_link(profile, size=2, stride=layout.tp * layout.dp, gpus_per_node=gpus_per_node)
    if framework.p2p_scatter_gather and layout.tp > 1:
        tp_link = coll.group_link(profile, size=layout.tp, stride=1, gpus_per_node=gpus_per_node)
        return coll.p2p_time(S / layout.tp, link) + coll.all_gather_time(S, layout.tp, tp_link)
    return coll.p2p_time(S / layout.tp if layout.sequence_parallel else S, link)


def _dp_exposed(model, layout, profile, framework, est_stages, memory, *, precision, gpus_per_node):
    """(per-rank exposed DP seconds incl. the tied-embedding sum, the largest DP time)."""
    g_b = BYTES_PER_PARAM[precision][1]
    dp, pp, S = layout.dp, layout.pp, len(est_stages)
    link = coll.group_link(profile, size=dp, stride=layout.tp, gpus_per_node=gpus_per_node)
    overlap = framework.dp_overlap == "last_backward" or (framework.dp_overlap == "no_pipeline" and pp == 1)
    exposed, totals = [], []
    for r in range(pp):
        mem = memory[r]
        if layout.distributed_optimizer:
            t = coll.reduce_scatter_time(g_b * mem.params, dp, link)
        else:
            t = coll.all_reduce_time(g_b * mem.params, dp, link)
        mine = [est_stages[s] for s in range(r, S, pp)]
        if overlap:
            hide = sum(st.B.total + st.W.total for st in mine)
            buckets = max(1, sum(st.blocks for st in mine))
            x = max(t / buckets, t - hide)
        else:
            x = t
        if model.tie_embeddings and S > 1 and (r == 0 or r == (S - 1) % pp):
            tied = coll.group_link(profile, size=2, stride=layout.tp * dp * max(1, pp - 1),
                                   gpus_per_node=gpus_per_node)
            x += coll.all_reduce_time(g_b * model.vocab_size // layout.tp * model.hidden_size, 2, tied)
        exposed.append(x)
        totals.append(t)
    return exposed, max(totals)


def estimate(model, layout, profile, *, global_batch: int, seq_len: int, precision: str = "bf16",
             gpus_per_node: int | None = None, framework="tandem", tp_across_nodes: bool = False,
             breakdown: bool = True, simulate: bool = True) -> Estimate:
    """Memory and time of ``layout`` running ``model`` on GPUs of ``profile``.

    ``model``: a ModelSpec or anything ``load_model`` takes; ``layout``: a Layout or its
    string (``"tp=8,pp=2,dp=32,mb=2,schedule=interleaved:v=5,recompute=full"``);
    ``profile``: a DeviceProfile, built-in name or JSON path. ``framework``: "tandem" (the
    runs this planner is for) or "megatron-sc21" (framework.py). ``breakdown=False`` skips
    the second simulation that separates exposed PP messages from the bubble. Raises
    PlanError when the layout cannot run (it says why). ``simulate=False`` puts the
    closed form of step.py in place of the simulation (the search ranks with it).
    """
    model, profile, framework = load_model(model), load_profile(profile), get_framework(framework)
    if isinstance(layout, str):
        layout = Layout.parse(layout)
    gpus_per_node = gpus_per_node or profile.gpus_per_node
    _check(model, layout, num_gpus=layout.gpus, gpus_per_node=gpus_per_node, global_batch=global_batch,
           seq_len=seq_len, precision=precision, framework=framework, tp_across_nodes=tp_across_nodes)
    m = layout.num_microbatches(global_batch)
    blocks = stage_blocks(model.num_layers, layout.num_stages)
    acts, working = _stage_activation(model, layout, framework, seq_len=seq_len, precision=precision, blocks=blocks)
    memory = rank_memory(model, layout, profile, precision=precision, blocks=blocks, m=m, stage_act=acts,
                         working=working)
    stages = stage_costs(model, layout, profile, framework, seq_len=seq_len, precision=precision, blocks=blocks,
                         gpus_per_node=gpus_per_node)
    p2p = _p2p(model, layout, profile, framework, seq_len=seq_len, precision=precision, gpus_per_node=gpus_per_node)
    quiet, slowdown = None, 1.0
    sharing = sharing_of(profile, layout, gpus_per_node)
    costs = {s: Costs(F=st.F.total, B=st.B.total, W=st.W.total, comm=p2p) for s, st in enumerate(stages)}
    if not simulate:
        sim = closed_form_step(layout, m, [st.F.total + st.B.total + st.W.total for st in stages], p2p)
    else:
        sim = simulate_step(layout, m, costs, sharing=sharing, jitter=profile.jitter)
        if breakdown and p2p > 0:
            quiet = simulate_step(layout, m, {s: replace(c, comm=0.0) for s, c in costs.items()}, sharing=sharing,
                                  jitter=profile.jitter)
        if sharing is not None:  # the work-weighted mean stretch of the actions
            slowdown = sim.work / (m * sum(st.F.total + st.B.total + st.W.total for st in stages))
    dp_exp, dp_total = _dp_exposed(model, layout, profile, framework, stages, memory, precision=precision,
                                   gpus_per_node=gpus_per_node)
    d = layout.dp if layout.distributed_optimizer else 1
    crowd = sharing.stretch(layout.pp) if sharing else 1.0  # every rank steps its optimizer at once
    opt = [crowd * memory_time(profile, OPTIMIZER_BYTES[precision] * r.params / d, kernels=10) for r in memory]
    gather = 0.0
    if layout.distributed_optimizer:
        link = coll.group_link(profile, size=layout.dp, stride=layout.tp, gpus_per_node=gpus_per_node)
        gather = max(coll.all_gather_time(BYTES_PER_PARAM[precision][0] * r.params, layout.dp, link) for r in memory)
    after_dp = max(sim.rank_end[r] + dp_exp[r] for r in range(layout.pp))
    step = max(sim.rank_end[r] + dp_exp[r] + opt[r] for r in range(layout.pp)) + gather
    return Estimate(model=model, layout=layout, profile=profile, framework=framework, global_batch=global_batch,
                    seq_len=seq_len, precision=precision, gpus_per_node=gpus_per_node, num_microbatches=m,
                    memory=tuple(memory), stages=tuple(stages), p2p_time=p2p, pipeline=sim, pipeline_no_comm=quiet,
                    dp_exposed=max(0.0, after_dp - sim.makespan), dp_total=dp_total,
                    optimizer_time=max(opt) + gather, step_time=step, slowdown=slowdown)
