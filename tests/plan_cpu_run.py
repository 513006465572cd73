"""Rank code of the planner's check against tandem's own CPU runs (test_plan_cpu.py).

On 4 gloo ranks: measure the machine (tandem.plan.calibrate), train tandem's GPT at
tp=2 x pp=2 with `tandem train`'s own model building and step (tandem.cli.train_loop) for
each schedule, recording every step's time and measured timeline, and measure the machine
again (a shared machine's load drifts: the profile takes both).
"""

import time

import torch
import torch.distributed as dist

MODEL = dict(vocab_size=128, max_seq_len=64, num_layers=4, hidden_size=128, num_heads=4, ffn_hidden_size=512)
BATCH, MICROBATCHES = 16, 4


def train_and_time(rank, world, schedules, steps):
    import tandem
    from tandem.cli import _parser, data
    from tandem.cli.train_loop import _build
    from tandem.models import GPTConfig
    from tandem.plan.calibrate import measure_rank

    torch.set_num_threads(1)  # one thread per rank, as `tandem train` launches them
    before = measure_rank(rank, world, quick=True)
    mesh = tandem.init_mesh(tp=2, pp=2, timeout=120)
    cfg = GPTConfig(**MODEL)
    runs = {}
    for schedule in schedules:
        # `tandem train`'s own arguments (its parser's defaults), AdamW without clipping or decay
        args = _parser().parse_args(["train", "--tp", "2", "--pp", "2", "--schedule", schedule, "--microbatches",
                                     str(MICROBATCHES), "--seed", "0", "--lr", "3e-3", "--timeout", "120",
                                     "--clip-grad", "0", "--weight-decay", "0"])
        model, module, opt, step_fn, timeline, _ = _build(args, cfg, mesh)
        times, timelines = [], []
        for step in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            inputs, targets = data.batch(step, BATCH, cfg.max_seq_len, cfg.vocab_size, seed=0, shard=mesh.dp_rank)
            step_fn(inputs, targets)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            mine = [tuple(r) for r in timeline()] if mesh.tp_rank == 0 else []
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            timelines.append([r for part in everyone for r in part])
        # the step time of the slowest rank, as the step's end is the last rank's
        gathered = [None] * world
        dist.all_gather_object(gathered, times)
        runs[schedule] = {"step_s": [max(t[i] for t in gathered) for i in range(steps)], "timelines": timelines}
    after = measure_rank(rank, world, quick=True)  # the machine once more: its load drifts
    return {"measured": [before, after], "runs": runs if rank == 0 else None}
