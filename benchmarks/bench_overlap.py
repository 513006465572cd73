"""Row-parallel linear with GEMM / all-reduce overlap, against compute-only and comm-only.

    torchrun --nproc-per-node 8 benchmarks/bench_overlap.py --dtype bf16      # GPUs: NCCL
    torchrun --nproc-per-node 2 benchmarks/bench_overlap.py --device cpu      # CPU: gloo
    python benchmarks/bench_overlap.py                                        # one rank

tp is the world size. Each rank holds x [M, K/tp] and w [N, K/tp]; the layer computes
all_reduce(x @ w.T) -> [M, N] (no bias). Measured (median per rank, the slowest rank):
  compute     the GEMM alone, (M, K/tp) @ (K/tp, N)
  comm        tandem's all-reduce of the [M, N] output alone
  chunks=c    tandem.comm.row_parallel_linear(x, w, None, comm, chunks=c)
and overlap efficiency = (t_compute + t_comm - t_overlapped) / min(t_compute, t_comm): 0 when
nothing overlaps, 1 when the smaller of the two is hidden entirely. Target (an NVLink box):
>= 0.70 at the best chunk count. With one rank the all-reduce is a local no-op, so the
efficiency is not meaningful (the verdict line says so).
"""

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def init_world(device: torch.device) -> None:
    """torchrun's env:// rendezvous, or a world of one in this process."""
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def slowest(ms: float) -> float:
    t = torch.tensor([ms], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, warmup=None, iters=None)
    p.add_argument("--tokens", type=int, default=None, help="M (default 8192 on GPU, 512 on CPU)")
    p.add_argument("--out-features", type=int, default=None, help="N (default 8192 on GPU, 512 on CPU)")
    p.add_argument("--in-features", type=int, default=None, help="K, split over tp (default 4N: an MLP's fc2)")
    p.add_argument("--chunks", default="1,2,4,8", help="chunk counts to try (default 1,2,4,8)")
    args = p.parse_args(argv)

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = common.resolve_device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    init_world(device)
    from tandem.comm import Communicator, row_parallel_linear

    rank, tp = dist.get_rank(), dist.get_world_size()
    comm = Communicator(dist.group.WORLD, device, timeout=300.0)
    cpu = device.type == "cpu"
    dtype = common.DTYPES[args.dtype] if args.dtype else (torch.float32 if cpu else torch.bfloat16)
    m = args.tokens or (512 if cpu else 8192)
    n = args.out_features or (512 if cpu else 8192)
    k = args.in_features or 4 * n
    if k % tp:
        raise SystemExit(f"--in-features {k} is not divisible by tp={tp}")
    warmup = args.warmup if args.warmup is not None else (2 if cpu else 5)
    iters = args.iters if args.iters is not None else (10 if cpu else 20)
    chunk_list = [int(c) for c in args.chunks.split(",") if c]

    gen = torch.Generator(device="cpu").manual_seed(args.seed + rank)
    x = common.random_tensor((m, k // tp), dtype=dtype, device=device, generator=gen)
    w = common.random_tensor((n, k // tp), dtype=dtype, device=device, generator=gen, scale=(k ** -0.5))
    out = torch.empty(m, n, dtype=dtype, device=device)

    # reference: one GEMM, torch.distributed's all-reduce, in float32
    ref = x.float() @ w.float().t()
    dist.all_reduce(ref)  # (M, N) summed over tp

    def compute():
        torch.mm(x, w.t(), out=out)  # (M, K/tp) @ (K/tp, N) -> (M, N)

    def communicate():
        comm.all_reduce(out).wait()  # (M, N) over tp

    env = common.environment(device, dtype=dtype, warmup=warmup, iters=iters, world_size=tp, tp=tp,
                             shape=f"M={m} N={n} K={k} (K/tp={k // tp})", backend=comm.backend)
    t_compute = slowest(common.benchmark(compute, device=device, warmup=warmup, iters=iters).median_ms)
    t_comm = slowest(common.benchmark(communicate, device=device, warmup=warmup, iters=iters).median_ms)
    table = common.Table([common.Column("variant", width=12), common.Column("time", "(ms)", 10),
                          common.Column("vs_sum", "(x)", 8), common.Column("efficiency", "", 11),
                          common.Column("#wrong", width=7)])
    if rank == 0:
        common.print_header(f"row-parallel linear: GEMM / all-reduce overlap, tp={tp}", env)
        print(table.header())
        print(table.row(["compute", t_compute, None, None, None]))
        print(table.row(["comm", t_comm, None, None, None]), flush=True)

    results = [dict(variant="compute", ms=t_compute), dict(variant="comm", ms=t_comm)]
    for chunks in chunk_list:
        got = row_parallel_linear(x, w, None, comm, chunks=chunks)
        common.synchronize(device)
        wrong = common.count_wrong(got.float().cpu(), ref.cpu(), dtype=dtype, reduction=k)
        t = slowest(common.benchmark(lambda: row_parallel_linear(x, w, None, comm, chunks=chunks), device=device,
                                     warmup=warmup, iters=iters).median_ms)
        eff = (t_compute + t_comm - t) / min(t_compute, t_comm) if min(t_compute, t_comm) > 0 else None
        results.append(dict(variant=f"chunks={chunks}", chunks=chunks, ms=t, efficiency=eff, wrong=wrong))
        if rank == 0:
            print(table.row([f"chunks={chunks}", t, t / (t_compute + t_comm), eff, wrong]), flush=True)

    effs = [r["efficiency"] for r in results if r.get("efficiency") is not None]
    targets = []
    if tp > 1:
        targets.append(common.target_line("overlap efficiency, best chunk count", max(effs) if effs else None, 0.70))
    wrong = sum(r.get("wrong", 0) for r in results)
    notes = ("# target not checked: with one rank the all-reduce is a no-op",) if tp == 1 else ()
    common.report("bench_overlap", args, env, results, targets, rank=rank, wrong=wrong, notes=notes,
                  speedups=[], skipped_shapes=[])
    dist.barrier()
    dist.destroy_process_group()
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
