"""What `tandem plan` prints: the ranked table, why the winner wins, the command that runs it,
one layout's breakdown, and the same as JSON."""

from __future__ import annotations

import json
import math

from tandem.plan.estimate import Estimate, memory_only
from tandem.plan.memory import BYTES_PER_PARAM

__all__ = ["format_table", "reasons", "command", "format_estimate", "plan_json", "estimate_json"]

GB = 1e9


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _flags(est: Estimate) -> str:
    lay = est.layout
    return ",".join(f for f, on in (("sp", lay.sequence_parallel), ("dopt", lay.distributed_optimizer)) if on) or "-"


def format_table(plan) -> str:
    """The ranked layouts, one per line."""
    head = (f"{'#':>2} {'tp':>3} {'pp':>3} {'dp':>5} {'schedule':>16} {'mb':>3} {'m':>5} {'recompute':>9} "
            f"{'flags':>7} {'GB/GPU':>7} {'step':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>5} {'bubble':>6}")
    rows = [head]
    for i, e in enumerate(plan.ranked, 1):
        lay = e.layout
        rows.append(f"{i:>2} {lay.tp:>3} {lay.pp:>3} {lay.dp:>5} {lay.schedule_name():>16} {lay.microbatch:>3} "
                    f"{e.num_microbatches:>5} {lay.recompute:>9} {_flags(e):>7} {e.max_memory / GB:>7.1f} "
                    f"{_time(e.step_time):>9} {e.tokens_per_s:>11,.0f} {e.tflops_per_gpu:>8.1f} {e.mfu:>5.2f} "
                    f"{e.bubble:>6.3f}")
    return "\n".join(rows)


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e12:.2f} TB" if nbytes >= 1e12 else f"{nbytes / GB:.0f} GB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("h") else "s")


def _static_bytes(est: Estimate) -> float:
    return est.model.num_params() * sum(BYTES_PER_PARAM[est.precision])


def reasons(plan) -> list[str]:
    """Why the winner, in the terms of the TP/PP guidance."""
    best, lay = plan.best, plan.best.layout
    G, N = plan.gpus_per_node, plan.num_gpus
    cap = plan.profile.memory_bytes
    out = []
    if lay.tp == 1:
        out.append("tp=1: the layers fit without being split, and tensor parallelism would only add all-reduces")
    else:
        share = best.tp_exposed / best.step_time
        where = "fills" if lay.tp == G else "stays inside"
        out.append(f"tp={lay.tp} {where} the {G}-GPU NVLink domain of a node; its all-reduces take "
                   f"{share:.0%} of the step")
    static = _static_bytes(best)
    per_gpu_no_pp = static / lay.tp
    b = sum(BYTES_PER_PARAM[best.precision])
    size = f"weights, gradients and optimizer states of a {best.model.num_params() / 1e9:.1f}B-parameter model " \
           f"need {_size(static)} ({b} bytes per parameter)"
    if lay.pp > 1 and per_gpu_no_pp > cap:
        out.append(f"pp={lay.pp} because {size}: {per_gpu_no_pp / GB:.0f} GB per GPU with tp={lay.tp} alone, "
                   f"{cap / GB:.0f} GB on a {plan.profile.name}")
    elif lay.pp > 1:
        out.append(f"pp={lay.pp}: the model would fit with tp={lay.tp} alone ({size}), but the pipeline "
                   f"is faster here (smaller tp, fewer all-reduces, per-GPU work on fewer layers)")
    else:
        out.append(f"pp=1: {size}, {per_gpu_no_pp / GB:.0f} GB per GPU with tp={lay.tp}: no pipeline needed")
    dopt = " with the distributed optimizer (optimizer states sharded over dp)" if lay.distributed_optimizer else ""
    out.append(f"dp={lay.dp}: data parallelism takes the remaining GPUs ({N} = {lay.tp} x {lay.pp} x {lay.dp}){dopt}")
    if lay.pp > 1:
        how = {"interleaved": f"interleaving v={lay.virtual_stages} chunks per rank cuts the bubble about "
                              f"{lay.virtual_stages}-fold",
               "zb-h1": "ZB-H1 fills the bubble with deferred weight-gradient work",
               "1f1b": "1F1B keeps at most pp microbatches in flight",
               "gpipe": "GPipe"}[lay.schedule]
        out.append(f"{_plural(best.num_microbatches, 'microbatch')} of {lay.microbatch} per step: the bubble is "
                   f"{best.bubble:.1%} of the step ({how})")
    if lay.recompute != "none":
        plain = memory_only(best.model, lay.with_(recompute="none"), best.profile, global_batch=best.global_batch,
                            seq_len=best.seq_len, precision=best.precision, framework=best.framework)
        need = max(r.total for r in plain)
        out.append(f"{lay.recompute} recomputation: without it the most loaded GPU would need {need / GB:.0f} GB")
    else:
        worst = max(best.memory, key=lambda r: r.total)
        out.append(f"no recomputation: the activations of {_plural(worst.peak_in_flight, 'microbatch')} in flight fit "
                   f"({worst.activations / GB:.1f} GB)")
    worst = max(best.memory, key=lambda r: r.total)
    out.append(f"memory: {worst.total / GB:.1f} of {cap / GB:.0f} GB per GPU on the most loaded pipeline rank "
               f"({worst.rank})")
    if len(plan.ranked) > 1:
        nxt = plan.ranked[1]
        out.append(f"runner-up: {nxt.layout} at {_time(nxt.step_time)} per step "
                   f"(+{nxt.step_time / best.step_time - 1:.1%})")
    return out


def command(est: Estimate) -> tuple[str, list[str]]:
    """(the command that runs ``est``'s layout with tandem train, what it does not do as planned)."""
    lay, N, G = est.layout, est.layout.gpus, est.gpus_per_node
    if N <= G:
        launcher = f"torchrun --standalone --nproc-per-node {N}"
    else:
        launcher = (f"torchrun --nnodes {math.ceil(N / G)} --nproc-per-node {G} --rdzv-backend c10d "
                    f"--rdzv-endpoint HOST:29500")
    schedule = "interleaved" if lay.schedule == "interleaved" else lay.schedule
    fields = est.model.gpt_config_fields(est.seq_len)
    notes = []
    if fields is None:
        notes.append(f"write {est.model.name}'s GPTConfig (norm=\"rmsnorm\", position=\"rope\", "
                     f"activation=\"swiglu\", ...) to MODEL.json, or start from its Hugging Face directory "
                     f"with --init-from")
        model = "MODEL.json"
    else:
        if lay.sequence_parallel:
            fields["sequence_parallel"] = True
        fields = {k: v for k, v in fields.items() if v is not None}
        model = "'" + json.dumps(fields, separators=(",", ":")) + "'"
    cmd = (f"{launcher} -m tandem train --tp {lay.tp} --pp {lay.pp} --dp {lay.dp} --schedule {schedule} "
           f"--microbatches {est.num_microbatches} --batch-size {est.global_batch // lay.dp} --model {model}")
    if est.precision != "fp32":
        cmd += f" --precision {est.precision}"
    if lay.recompute != "none":
        cmd += f" --recompute {lay.recompute}"
    if lay.distributed_optimizer:
        cmd += " --zero1"
    if lay.pp == 1 and est.num_microbatches > 1:
        notes.append("tandem train without a pipeline runs the replica's whole batch at once (no gradient "
                     "accumulation over microbatches)")
    if lay.schedule == "interleaved" and lay.virtual_stages != 2:
        notes.append(f"tandem train interleaves v=2 chunks per rank (the plan has v={lay.virtual_stages})")
    return cmd, notes


def format_estimate(est: Estimate) -> str:
    """One layout's memory per pipeline rank and time per step."""
    lay = est.layout
    lines = [f"{est.model.name} on {lay.gpus} x {est.profile.name} ({est.framework.name}), global batch "
             f"{est.global_batch} x {est.seq_len} tokens, {est.precision}",
             f"layout {lay}: {est.num_microbatches} microbatches per step",
             "memory per GPU (GB):",
             f"  {'rank':>4} {'params':>9} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'recomp':>7} "
             f"{'reserve':>7} {'total':>7}  in flight"]
    for r in est.memory:
        lines.append(f"  {r.rank:>4} {r.params / 1e9:>8.2f}B {r.weights / GB:>8.1f} {r.grads / GB:>7.1f} "
                     f"{r.optimizer / GB:>7.1f} {r.activations / GB:>7.1f} {r.working / GB:>7.1f} "
                     f"{r.reserve / GB:>7.1f} {r.total / GB:>7.1f}  {r.peak_in_flight}")
    fit = "fits" if est.fits else "DOES NOT FIT"
    lines.append(f"  most loaded: {est.max_memory / GB:.1f} of {est.capacity / GB:.0f} GB: {fit}")
    lines.append("time per step (the busiest pipeline rank):")
    parts = [("compute (recomputation included)", est.compute_time), ("exposed TP communication", est.tp_exposed),
             ("exposed PP communication", est.pp_exposed), ("pipeline bubble", est.bubble_time),
             ("exposed DP communication", est.dp_exposed), ("optimizer step", est.optimizer_time)]
    for name, t in parts:
        lines.append(f"  {name:<34} {_time(t):>10}  {t / est.step_time:6.1%}")
    sim = est.pipeline.simulated
    how = (f"simulated at m={sim[0]}" if len(sim) == 1 else
           f"simulated at m={sim[0]} and {sim[1]}, extended to m={est.num_microbatches}")
    lines.append(f"  {'step':<34} {_time(est.step_time):>10}  ({how}; bubble {est.bubble:.1%})")
    lines.append(f"throughput: {est.tokens_per_s:,.0f} tokens/s, {est.tflops_per_gpu:.1f} TFLOP/s per GPU counting "
                 f"recomputation ({est.model_tflops_per_gpu:.1f} without), MFU {est.mfu:.1%}")
    return "\n".join(lines)


def estimate_json(est: Estimate) -> dict:
    return {
        "layout": str(est.layout), "num_microbatches": est.num_microbatches, "fits": est.fits,
        "memory_bytes": [{"rank": r.rank, "params": r.params, "weights": r.weights, "grads": r.grads,
                          "optimizer": r.optimizer, "activations": r.activations, "recompute": r.working,
                          "reserve": r.reserve, "total": r.total, "peak_in_flight": r.peak_in_flight}
                         for r in est.memory],
        "time_s": {"step": est.step_time, "compute": est.compute_time, "tp_exposed": est.tp_exposed,
                   "pp_exposed": est.pp_exposed, "bubble": est.bubble_time, "dp_exposed": est.dp_exposed,
                   "optimizer": est.optimizer_time},
        "stages": [{"blocks": s.blocks, "F_s": s.F.total, "B_s": s.B.total, "W_s": s.W.total} for s in est.stages],
        "p2p_s": est.p2p_time, "bubble_fraction": est.bubble, "simulated_microbatches": list(est.pipeline.simulated),
        "tokens_per_s": est.tokens_per_s, "tflops_per_gpu": est.tflops_per_gpu,
        "model_tflops_per_gpu": est.model_tflops_per_gpu, "mfu": est.mfu,
    }


def plan_json(plan) -> dict:
    cmd, notes = command(plan.best)
    return {
        "model": plan.model.to_dict(), "profile": plan.profile.name, "framework": plan.framework.name,
        "gpus": plan.num_gpus, "gpus_per_node": plan.gpus_per_node, "global_batch": plan.global_batch,
        "seq_len": plan.seq_len, "precision": plan.precision,
        "searched": {"enumerated": plan.enumerated, "runnable": plan.runnable, "fitting": plan.fitting,
                     "seconds": plan.seconds},
        "ranked": [estimate_json(e) for e in plan.ranked],
        "reasons": reasons(plan), "command": cmd, "command_notes": notes,
    }
