"""The distributed optimizer (ZeRO-1) against plain data parallelism: step time and optimizer
memory per rank, same model, data and buckets.

Run under torchrun; dp is the world size (tp = pp = 1):

    torchrun --nproc-per-node 2 benchmarks/bench_zero.py [--quick]

Each variant trains tandem's GPT through a PipelineRunner (one stage, 1F1B over the
microbatches, dp bucket reduction started during the last backward), clips the global
gradient norm at 1.0 and steps AdamW:

- adamw: torch.optim.AdamW on every rank; the runner all-reduces gradient buckets;
- mixed: tandem's MixedPrecisionOptimizer in fp32 (fp32 gradient buffers, all-reduced);
- zero1: DistributedOptimizer: buckets reduce-scattered, each rank steps 1/dp of the masters
  and AdamW states, then the parameters are all-gathered;
- zero1+overlap: the same with the all-gather waited for at the next forward.

Columns: median step ms, the ratio to adamw (target for zero1: <= 1.10x), and this rank's
bytes of AdamW state, fp32 master weights and gradient buffers; the loss column shows that
all variants train the same model (difference to adamw after the timed steps).
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VARIANTS = ("adamw", "mixed", "zero1", "zero1+overlap")


def _setup(variant, cfg, mesh, m, bucket_bytes, lr):
    import tandem
    from tandem.models import GPT
    from tandem.nn import vocab_parallel_cross_entropy
    from tandem.optim import DistributedOptimizer, MixedPrecisionOptimizer, weight_decay_groups
    from tandem.pipeline import OneFOneB, PipelineRunner, split

    torch.manual_seed(0)
    model = GPT(cfg, mesh=mesh)
    stage = split(model.layers(), 1, stage=0, mesh=mesh)
    groups = weight_decay_groups(stage, 0.01)
    if variant == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr)
    elif variant == "mixed":
        opt = MixedPrecisionOptimizer(groups, torch.optim.AdamW, mesh=mesh, lr=lr, bucket_bytes=bucket_bytes)
    else:
        opt = DistributedOptimizer(groups, torch.optim.AdamW, mesh=mesh, lr=lr, bucket_bytes=bucket_bytes,
                                   overlap_param_gather=variant.endswith("overlap"))
    tandem_opt = variant != "adamw"
    runner = PipelineRunner(stage, mesh=mesh, schedule=OneFOneB(1, m), num_microbatches=m,
                            loss_fn=lambda y, t: vocab_parallel_cross_entropy(y, t, mesh=mesh),
                            dp_bucket_bytes=bucket_bytes, optimizer=opt if tandem_opt else None)

    def step(ids, targets):
        loss = runner.step(ids, targets)
        tandem.clip_grad_norm_(opt if tandem_opt else stage, 1.0, mesh=mesh)
        opt.step()
        opt.zero_grad()
        return loss

    return step, opt, runner, stage


def _memory(opt, n_params) -> dict:
    """This rank's bytes of optimizer state, fp32 masters and gradient buffers (after a step)."""
    from tandem.optim import MixedPrecisionOptimizer

    if isinstance(opt, MixedPrecisionOptimizer):
        return dict(states=opt.state_bytes(), masters=opt.master_bytes(),
                    grads=sum(b.grad.numel() * 4 for b in opt.layout.buckets))
    return dict(states=sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                           if torch.is_tensor(v) and v.dim() > 0), masters=0, grads=4 * n_params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, warmup=None, iters=None)
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    p.add_argument("--bucket-mb", type=float, default=4.0, help="gradient bucket size (MiB of fp32)")
    args = p.parse_args(argv)

    import tandem
    from tandem.models import GPTConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh = tandem.init_mesh(dp=world)
    device = mesh.device
    quick = args.quick
    warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    iters = args.iters if args.iters is not None else (5 if quick else 10)
    h, layers, s, b, m = (128, 2, 64, 8, 2) if quick else (384, 4, 128, 8, 2)
    cfg = GPTConfig(vocab_size=512, max_seq_len=s, num_layers=layers, hidden_size=h, num_heads=8)
    bucket_bytes = int(args.bucket_mb * 2**20)
    env = common.environment(device, dtype=torch.float32, warmup=warmup, iters=iters, world_size=world, dp=world,
                             model=f"GPT h={h} layers={layers} seq={s} vocab={cfg.vocab_size}",
                             batch=f"{b} sequences per replica, {m} microbatches", buckets=f"{args.bucket_mb:g} MiB")
    rank0 = mesh.rank == 0
    table = common.Table([common.Column("variant", width=14), common.Column("dp", width=3),
                          common.Column("step", "ms", 9, ".1f"), common.Column("vs_adamw", "x", 9, ".3f"),
                          common.Column("states", "MiB", 8, ".3f"), common.Column("masters", "MiB", 8, ".3f"),
                          common.Column("grads", "MiB", 8, ".3f"), common.Column("loss_diff", width=10, fmt=".1e")])
    if rank0:
        common.print_header(f"distributed optimizer (ZeRO-1) vs data parallel AdamW, dp={world}", env)
        print(table.header(), flush=True)
    gen = torch.Generator().manual_seed(args.seed + mesh.dp_rank)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen, device="cpu").to(device)
    targets = torch.roll(ids, -1, dims=1)
    # every variant built up front, then timed round-robin: a busy machine's drift hits all alike
    setups = {v: _setup(v, cfg, mesh, m, bucket_bytes, lr=1e-3) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    losses = {}
    for i in range(warmup + iters):
        for variant, (step, *_rest) in setups.items():
            dist.barrier()
            t0 = time.perf_counter()
            losses[variant] = step(ids, targets)
            common.synchronize(device)
            if i >= warmup:
                times[variant].append(time.perf_counter() - t0)
    results = []
    for variant, (step, opt, runner, stage) in setups.items():
        n_params = sum(p.numel() for p in stage.parameters())
        memory = _memory(opt, n_params)
        t = torch.tensor([sorted(times[variant])[iters // 2] * 1e3], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
        ms = t.item()
        base = ms if variant == "adamw" else base
        row = dict(variant=variant, dp=world, step_ms=ms, vs_adamw=ms / base, params=n_params,
                   loss_diff=abs(losses[variant].item() - losses["adamw"].item()),
                   **{f"{k}_bytes": v for k, v in memory.items()})
        results.append(row)
        if rank0:
            print(table.row([variant, world, ms, ms / base, memory["states"] / 2**20, memory["masters"] / 2**20,
                             memory["grads"] / 2**20, row["loss_diff"]]), flush=True)
        runner.close()
        if variant != "adamw":
            opt.remove()
    zero = next(r for r in results if r["variant"] == "zero1")
    targets_ = [common.target_line("zero1 step time: adamw / zero1", base / zero["step_ms"], 1 / 1.10),
                common.target_line("zero1 AdamW state per rank: (8 bytes x params / dp) / measured",
                                   8 * n_params / world / max(zero["states_bytes"], 1), 0.99)]
    common.report("bench_zero", args, env, results, targets_, rank=mesh.rank,
                  notes=(f"# note  {n_params:,} parameters; over gloo the reduce-scatter runs as an all-reduce of "
                         "which each rank keeps its shard (see tandem.optim._reducer)",))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
