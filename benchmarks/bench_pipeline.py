"""Pipeline step time and bubble: tandem's PipelineRunner against the simulator's
prediction and torch.distributed.pipelining, on the same GPT split, in the same run.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_pipeline.py [--microbatches 2 4 8] [--json out.json]

tandem's and torch's steps alternate (one each per iteration) so that drift of the
machine hits both alike; every figure is a median over the iterations. One row per
schedule and number of microbatches m:

    tandem    tandem's step time (slowest rank)
    bubble    idle share of its measured timeline (all ranks, first F to last backward)
    msg       one-way time of one activation message: half the median round trip of a
              ping-pong between pipeline ranks 0 and 1 over the runner's own StageLink
    lat       a message inside the step: from a send's start to the start of the F or B
              that consumed it, where the consumer's rank was idle when the send started
    sim       the simulator's plan of the runner's own action lists, for the costs measured
    sim_bub   in that step (per stage the mean F, B, W and the mean host time of posting a
              send and a receive) with message time msg: its makespan and bubble
    rpl_bub   the bubble of the replay: the same lists with every action at its own
              measured time and messages at lat (the plan's gap to the measurement, less
              what per-action variation and in-step message time explain)
    post      mean host time of posting one message (n/a on GPUs)
    ovh/act   runtime overhead per action: the measured span (first F to last backward)
              minus the plan's makespan, over the actions of a rank
    fixed     the step's cost outside that span: starting, sharing the loss, waiting for
              the last sends, tied and dp gradients
    floor     the plan of the step's measured compute with free messages: what no runtime
              can beat with this schedule on this machine
    torch     torch.distributed.pipelining's step time for the matching schedule
              (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B; none for ZB-H1)
    vs_torch  torch / tandem

Runs on CPU with gloo (and on GPUs with NCCL when launched on them; there the timeline
holds stream times, so the replay takes measured times of F, B and W only). Every rank
runs the whole table; rank 0 prints it. Run it on one machine: bubble and lat compare the
timelines of different ranks, whose clocks only agree within a machine.
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from tandem.models import GPT, GPTConfig  # noqa: E402
from tandem.nn import vocab_parallel_cross_entropy  # noqa: E402
from tandem.pipeline import (Costs, GPipe, Interleaved1F1B, OneFOneB, PipelineRunner,  # noqa: E402
                             ZeroBubbleH1, bubble_fraction, lower, simulate, split)
from tandem.pipeline.ir import ActionKind  # noqa: E402

SCHEDULES = {"gpipe": (GPipe, 1), "1f1b": (OneFOneB, 1), "interleaved": (Interleaved1F1B, 2),
             "zb-h1": (ZeroBubbleH1, 1)}


def _config(args) -> GPTConfig:
    return GPTConfig(vocab_size=args.vocab, max_seq_len=args.seq, num_layers=args.layers,
                     hidden_size=args.hidden, num_heads=args.heads)


def _stages(args, mesh, num_stages, stage_ids):
    torch.manual_seed(args.seed)
    model = GPT(_config(args), mesh=mesh, device=mesh.device)
    return [split(model.layers(), num_stages, balance="uniform", stage=s) for s in stage_ids]


def _schedule(name, p, m):
    cls, v = SCHEDULES[name]
    return cls(p, m, virtual_stages=v) if v > 1 else cls(p, m)


def _timed(step, device) -> float:
    """Seconds of one step on the slowest rank (all ranks start together)."""
    dist.barrier()
    common.synchronize(device)
    t0 = time.perf_counter()
    step()
    common.synchronize(device)
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _message_s(runner, mesh, shape, repeats=30) -> float:
    """One-way seconds of one activation message between pipeline ranks 0 and 1: half the
    median round trip of a ping-pong over the runner's StageLink (same shapes as a step's)."""
    link = runner.p2p.link if runner.p2p is not None else None
    x = torch.zeros(shape, device=mesh.device)
    trips = []
    dist.barrier()
    for _ in range(repeats):
        if mesh.pp_rank == 0 and link is not None:
            t0 = time.perf_counter()
            link.send_forward(x)
            link.recv_backward()
            trips.append(time.perf_counter() - t0)
        elif mesh.pp_rank == 1:
            link.send_backward(link.recv_forward())
    if link is not None:
        link.wait_sends()
    t = torch.tensor([statistics.median(trips) / 2 if trips else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # rank 0's figure, everywhere
    return float(t)


def _us(seconds):
    return None if seconds is None else seconds * 1e6


def _costs(timeline, split_backward, comm_s=0.0, posting=True):
    """Simulator costs from a measured timeline: per stage the mean F, B, W seconds and (with
    ``posting``: host timelines) the mean host time of posting a send and a receive (the
    SEND / RECV records), with the message time ``comm_s``."""
    K = ActionKind
    per = {}
    for rec in timeline:
        per.setdefault((rec.stage, rec.kind), []).append(rec.end_s - rec.start_s)
    mean = lambda stage, kinds: statistics.mean(  # noqa: E731
        [d for k in kinds for d in per.get((stage, k), [])] or [0.0])
    costs = {}
    for stage in sorted({s for s, k in per if k.is_compute}):
        f, b = mean(stage, [K.F]), mean(stage, [K.B])
        w = mean(stage, [K.W]) if split_backward else b / 2
        if not split_backward:
            b /= 2  # a full backward costs B + W
        costs[stage] = Costs(F=f, B=b, W=w, comm=comm_s,
                             post_send=mean(stage, [K.SEND_F, K.SEND_B]) if posting else 0.0,
                             post_recv=mean(stage, [K.RECV_F, K.RECV_B]) if posting else 0.0)
    return costs


def _latency_s(timeline, layout):
    """Median time from a send's start to the start of the F or B that consumed its data,
    over the consumers whose rank had nothing left to do when the send started (its previous
    action had ended): what a message takes inside a step, where the ranks compute while it
    travels, from posting on one rank to computing on the other."""
    K = ActionKind
    sends = {(rec.kind, rec.stage, rec.microbatch): rec.start_s for rec in timeline
             if rec.kind in (K.SEND_F, K.SEND_B)}
    samples = []
    for rank in {rec.rank for rec in timeline}:
        mine = sorted((rec for rec in timeline if rec.rank == rank), key=lambda rec: rec.start_s)
        for before, rec in zip(mine, mine[1:]):
            if rec.kind is K.F:
                src = (K.SEND_F, rec.stage - 1, rec.microbatch)
            elif rec.kind is K.B:
                src = (K.SEND_B, rec.stage + 1, rec.microbatch)
            else:
                continue
            if src in sends and layout.rank_of(src[1]) != rank and before.end_s <= sends[src]:
                samples.append(rec.start_s - sends[src])
    return statistics.median(samples) if samples else None


def _tandem_step(args, mesh, name, m, data):
    p = mesh.pp
    sched = _schedule(name, p, m)
    stages = _stages(args, mesh, sched.num_stages, sched.layout.stages_of(mesh.pp_rank))
    runner = PipelineRunner(stages if len(stages) > 1 else stages[0], mesh=mesh, schedule=sched,
                            loss_fn=lambda y, t: vocab_parallel_cross_entropy(y, t, mesh=mesh),
                            num_microbatches=m)
    ids, targets = data
    first, last = 0 in runner.stages, sched.num_stages - 1 in runner.stages
    return (lambda: runner.step(ids if first else None, targets if last else None)), runner, sched


def _torch_step(args, mesh, name, m, data):
    from torch.distributed import pipelining as tp

    classes = {"gpipe": tp.ScheduleGPipe, "1f1b": tp.Schedule1F1B,
               "interleaved": tp.ScheduleInterleaved1F1B}
    if name not in classes:
        return None
    p = mesh.pp
    sched = _schedule(name, p, m)
    mods = _stages(args, mesh, sched.num_stages, sched.layout.stages_of(mesh.pp_rank))
    stages = [tp.PipelineStage(mod, mod.stage, sched.num_stages, mesh.device, group=mesh.pp_group)
              for mod in mods]

    def loss_fn(y, t):
        return torch.nn.functional.cross_entropy(y.flatten(0, 1), t.flatten())

    if name == "interleaved":
        schedule = classes[name](stages, n_microbatches=m, loss_fn=loss_fn)
    else:
        schedule = classes[name](stages[0], n_microbatches=m, loss_fn=loss_fn)
    ids, targets = data
    first, last = mesh.pp_rank == 0, mesh.pp_rank == p - 1

    def step():
        if first and last:
            schedule.step(ids, target=targets, losses=[])
        elif first:
            schedule.step(ids)
        elif last:
            schedule.step(target=targets, losses=[])
        else:
            schedule.step()

    return step


def run_pair(args, mesh, name, m, data):
    """tandem's and torch's steps alternately (one each per iteration, so that the machine's
    drift hits both alike); per tandem step its measured timeline and the simulator's plan
    for the costs it measured. Medians over the iterations."""
    p = mesh.pp
    step, runner, sched = _tandem_step(args, mesh, name, m, data)
    torch_step = _torch_step(args, mesh, name, m, data)
    for _ in range(args.warmup):
        step()
        if torch_step:
            torch_step()
    b, s = data[0].shape
    comm_s = _message_s(runner, mesh, (b // m, s, args.hidden)) if p > 1 else 0.0
    host = mesh.device.type == "cpu"  # GPU timelines hold stream times: posting is not on them
    lowered = lower(sched)  # the lists every runner executes
    rows = []
    for _ in range(args.iters):
        t = _timed(step, mesh.device)
        timelines = [None] * p
        dist.all_gather_object(timelines, runner.resolve_timeline(), group=mesh.pp_group)
        merged = [rec for tl in timelines for rec in tl]
        costs = _costs(merged, sched.split_backward, comm_s, posting=host)
        sim = simulate(lowered, costs)  # the plan: the runner's own lists, per-stage costs
        # the floor: this step's compute with free messages, what no runtime can beat
        floor = simulate(lowered, {s: replace(c, comm=0.0, post_send=0.0, post_recv=0.0)
                                   for s, c in costs.items()})
        # the replay: every action with its own measured time, messages with their in-step time
        latency = _latency_s(merged, sched.layout)
        own = {rec.action: rec.end_s - rec.start_s for rec in merged  # GPUs: compute only
               if host or rec.kind.is_compute}
        replay = simulate(lowered, {s: replace(c, comm=latency if latency is not None else comm_s)
                                    for s, c in costs.items()}, durations=own)
        actions = max(len(tl) for tl in timelines)
        compute = [rec for rec in merged if rec.kind.is_compute]
        span = max(rec.end_s for rec in compute) - min(rec.start_s for rec in compute)
        posts = [rec.end_s - rec.start_s for rec in merged if not rec.kind.is_compute]
        rows.append({"tandem_ms": t * 1e3, "bubble": bubble_fraction(merged, p), "sim_ms": sim.makespan * 1e3,
                     "sim_bubble": sim.bubble_fraction, "overhead_us": (span - sim.makespan) / actions * 1e6,
                     # on GPUs SEND/RECV records are stream times, not the host's posting time
                     "post_us": statistics.mean(posts) * 1e6 if posts and host else None,
                     "fixed_ms": (t - span) * 1e3, "replay_bubble": replay.bubble_fraction,
                     "floor_ms": floor.makespan * 1e3, "latency_us": _us(latency),
                     "torch_ms": _timed(torch_step, mesh.device) * 1e3 if torch_step else None})

    def med(key):  # None (n/a) when no iteration measured it
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else None

    out = {k: med(k) for k in ("tandem_ms", "bubble", "sim_ms", "sim_bubble", "overhead_us", "post_us",
                               "fixed_ms", "floor_ms", "latency_us", "replay_bubble")}
    out.update(message_us=comm_s * 1e6, torch_ms=med("torch_ms") if torch_step else None)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, warmup=2, iters=5)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8], help="values of m")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()

    import tandem

    mesh = tandem.init_mesh(pp=int(os.environ.get("WORLD_SIZE", 1)), backend=None)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // mesh.world_size))
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(mesh.device)
    data = (ids, torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(mesh.device))
    env = common.environment(mesh.device, dtype=torch.float32, warmup=args.warmup, iters=args.iters,
                             world_size=mesh.world_size, backend=dist.get_backend(), pp=mesh.pp,
                             model=f"GPT L={args.layers} h={args.hidden} V={args.vocab}",
                             batch=f"{args.batch}x{args.seq}")
    table = common.Table([common.Column("schedule", width=12), common.Column("m", width=3),
                          common.Column("tandem", "ms", 9, ".2f"), common.Column("bubble", "", 7, ".3f"),
                          common.Column("msg", "us", 6, ".0f"), common.Column("lat", "us", 6, ".0f"),
                          common.Column("sim", "ms", 9, ".2f"), common.Column("sim_bub", "", 7, ".3f"),
                          common.Column("rpl_bub", "", 7, ".3f"),
                          common.Column("post", "us", 5, ".0f"), common.Column("ovh/act", "us", 8, ".0f"),
                          common.Column("fixed", "ms", 6, ".2f"),
                          common.Column("floor", "ms", 7, ".2f"),
                          common.Column("torch", "ms", 9, ".2f"), common.Column("vs_torch", "x", 8, ".2f")])
    if mesh.rank == 0:
        common.print_header("bench_pipeline: PipelineRunner vs simulator vs torch.distributed.pipelining", env)
        print(table.header(), flush=True)
    results = []
    for name in args.schedules:
        for m in args.microbatches:
            if m < mesh.pp or (SCHEDULES[name][1] > 1 and m % mesh.pp):
                continue
            if args.batch % m:
                continue
            row = run_pair(args, mesh, name, m, data)
            torch_ms = row["torch_ms"]
            row.update(schedule=name, m=m, speedup=(torch_ms / row["tandem_ms"]) if torch_ms else None)
            results.append(row)
            if mesh.rank == 0:
                print(table.row([name, m, row["tandem_ms"], row["bubble"], row["message_us"],
                                 row["latency_us"], row["sim_ms"],
                                 row["sim_bubble"], row["replay_bubble"], row["post_us"], row["overhead_us"], row["fixed_ms"],
                                 row["floor_ms"], torch_ms, row["speedup"]]),
                      flush=True)
    targets, notes = [], []
    if mesh.pp > 1 and results:
        vs = [r["speedup"] for r in results if r["speedup"]]
        # step time <= 0.9 x torch's  <=>  torch / tandem >= 1 / 0.9
        targets.append(common.target_line("step time: torch.distributed.pipelining / tandem, worst row",
                                          min(vs) if vs else None, 1 / 0.9))
        # overhead <= 100 us  <=>  100 / overhead >= 1 (checked as a ratio to share the format)
        worst = max(r["overhead_us"] for r in results)
        targets.append(common.target_line(f"100 us / worst overhead per action ({worst:.0f} us)",
                                          100.0 / worst if worst > 0 else float("inf"), 1.0))
        gaps = [abs(r["bubble"] - r["sim_bubble"]) / r["sim_bubble"] for r in results if r["sim_bubble"] > 0]
        worst_gap = max(gaps) if gaps else None
        targets.append(common.target_line(
            f"bubble within 10% of the simulator's: 0.10 / worst relative gap "
            f"({'n/a' if worst_gap is None else f'{worst_gap:.2f}'})",
            (0.10 / worst_gap if worst_gap else float("inf")) if worst_gap is not None else None, 1.0))
        replayed = [abs(r["bubble"] - r["replay_bubble"]) / r["replay_bubble"] for r in results
                    if r["replay_bubble"] > 0]
        if replayed:  # what the plan's gap is made of: per-action variation and message time
            notes.append(f"# note  bubble vs the replay (each action's measured time, messages at "
                         f"their in-step time): worst relative gap {max(replayed):.2f}")
    out_of_reach = [f"{r['schedule']} m={r['m']}" for r in results
                    if r["torch_ms"] and r["floor_ms"] > 0.9 * r["torch_ms"]]
    if out_of_reach:  # the compute alone, with free messages, is slower than the step target
        notes.append(f"# note  floor > 0.9 x torch's step (no runtime meets the step target here): "
                     f"{', '.join(out_of_reach)}")
    common.report("bench_pipeline", args, env, results, targets, rank=mesh.rank, notes=tuple(notes))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
