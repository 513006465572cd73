"""Collectives and send/recv: tandem's Communicator next to torch.distributed, nccl-tests style.

    torchrun --nproc-per-node 8 benchmarks/bench_comm.py -b 8 -e 256M -f 2     # GPUs: NCCL
    torchrun --nproc-per-node 2 benchmarks/bench_comm.py --device cpu          # CPU: gloo
    python benchmarks/bench_comm.py                                            # one rank

For every size of the sweep (bytes per rank's buffer: the all_reduce tensor, the
all_gather input... as nccl-tests' -b/-e/-f) and every operation, both implementations run
the same operation on the same buffers: time (median over ranks' medians, the slowest rank),
algbw = bytes / time and busbw = algbw x {2(n-1)/n all_reduce, (n-1)/n all_gather and
reduce_scatter, 1 sendrecv}, and #wrong from one checked run before timing. sendrecv is
nccl-tests': every rank sends to rank+1 and receives from rank-1 at once.

Targets (an NVLink box): all_reduce busbw >= 0.95 x torch.distributed's at >= 64 MiB;
4 KiB sendrecv time <= 1.2 x torch.distributed's. With one rank the operations are local
copies and the targets are not meaningful (the verdict lines say so).
"""

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OPS = ("all_reduce", "all_gather", "reduce_scatter", "sendrecv")
# the names of this torch (newer ones renamed the *_tensor collectives to *_single)
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def parse_size(text: str) -> int:
    """nccl-tests sizes: 8, 64K, 256M, 1G (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def init_world(device: torch.device) -> None:
    """torchrun's env:// rendezvous, or a world of one in this process."""
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _fill(rank: int, count: int, dtype, device, salt: int) -> torch.Tensor:
    """Small integers (exact in every dtype and every sum order), different per rank."""
    g = torch.Generator(device="cpu").manual_seed(1000 * rank + salt)
    return torch.randint(-4, 5, (count,), generator=g).to(dtype).to(device)


class Case:
    """One operation at one size: buffers for tandem and for torch.distributed, a check, a run."""

    def __init__(self, op, count, dtype, device, comm, rank, n):
        self.op, self.count, self.dtype, self.device, self.comm, self.rank, self.n = op, count, dtype, device, comm, rank, n
        nxt, prv = (rank + 1) % n, (rank - 1) % n
        if op == "all_reduce":  # [count] summed over ranks, in place
            self.inp = _fill(rank, count, dtype, device, 0)
            self.want = sum(_fill(r, count, torch.float64, "cpu", 0) for r in range(n))
            self.out = self.inp
        elif op == "all_gather":  # [count] per rank -> [n * count]
            self.inp = _fill(rank, count, dtype, device, 1)
            self.out = torch.empty(n * count, dtype=dtype, device=device)
            self.want = torch.cat([_fill(r, count, torch.float64, "cpu", 1) for r in range(n)])
        elif op == "reduce_scatter":  # [n * count] per rank -> [count], block r of the sum
            self.inp = _fill(rank, n * count, dtype, device, 2)
            self.out = torch.empty(count, dtype=dtype, device=device)
            self.want = sum(_fill(r, n * count, torch.float64, "cpu", 2) for r in range(n))[rank * count:(rank + 1) * count]
        else:  # sendrecv: [count] to rank+1, [count] from rank-1
            self.inp = _fill(rank, count, dtype, device, 3)
            self.out = torch.empty(count, dtype=dtype, device=device)
            self.want = _fill(prv, count, torch.float64, "cpu", 3)
        self.nxt, self.prv = nxt, prv

    def tandem(self):
        c = self.comm
        if self.op == "all_reduce":
            c.all_reduce(self.inp).wait()
        elif self.op == "all_gather":
            c.all_gather(self.out, self.inp).wait()
        elif self.op == "reduce_scatter":
            c.reduce_scatter(self.out, self.inp).wait()
        else:
            for w in c.batch_p2p([("send", self.inp, self.nxt), ("recv", self.out, self.prv)]):
                w.wait()

    def torch(self):
        if self.op == "all_reduce":
            dist.all_reduce(self.inp)
        elif self.op == "all_gather":
            _ALL_GATHER(self.out, self.inp)
        elif self.op == "reduce_scatter":
            _REDUCE_SCATTER(self.out, self.inp)
        elif self.device.type == "cuda":
            ops = [dist.P2POp(dist.isend, self.inp, self.nxt), dist.P2POp(dist.irecv, self.out, self.prv)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        else:  # gloo has no reliable batch_isend_irecv: post both, then wait
            ws = [dist.isend(self.inp, self.nxt), dist.irecv(self.out, self.prv)]
            for w in ws:
                w.wait()

    def wrong_after(self, run) -> int:
        if self.op == "all_reduce":  # in place: restore the input first
            self.inp.copy_(_fill(self.rank, self.count, self.dtype, self.device, 0))
        run()
        common.synchronize(self.device)
        return common.count_wrong(self.out.cpu(), self.want, dtype=self.dtype, reduction=self.n)

    @property
    def nbytes(self) -> int:
        """nccl-tests' size column: the bytes of the larger buffer of one rank."""
        return max(self.inp.numel(), self.out.numel()) * self.inp.element_size()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, warmup=None, iters=None)
    p.add_argument("-b", "--minbytes", default=None, help="smallest size (default 8; nccl-tests units K/M/G)")
    p.add_argument("-e", "--maxbytes", default=None, help="largest size (default 256M on GPU, 1M on CPU)")
    p.add_argument("-f", "--stepfactor", type=int, default=2, help="size multiplier between rows (default 2)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    args = p.parse_args(argv)

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = common.resolve_device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    init_world(device)
    from tandem.comm import Communicator

    rank, n = dist.get_rank(), dist.get_world_size()
    comm = Communicator(dist.group.WORLD, device, timeout=300.0)
    dtype = common.DTYPES[args.dtype] if args.dtype else torch.float32
    cpu = device.type == "cpu"
    warmup = args.warmup if args.warmup is not None else (3 if cpu else 10)
    iters = args.iters if args.iters is not None else (10 if cpu else 50)
    lo, hi = parse_size(args.minbytes or "8"), parse_size(args.maxbytes or ("1M" if cpu else "256M"))
    ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise SystemExit(f"--ops: unknown {bad}; choose from {OPS}")
    if n == 1 and "sendrecv" in ops and cpu:
        ops.remove("sendrecv")  # gloo cannot send to itself

    env = common.environment(device, dtype=dtype, warmup=warmup, iters=iters, world_size=n,
                             tandem_backend=comm.backend, torch_backend=str(dist.get_backend()),
                             sweep=f"-b {lo} -e {hi} -f {args.stepfactor}")
    cols = [common.Column("size", "(B)", 12), common.Column("count", "(elements)", 12), common.Column("type", width=8),
            common.Column("op", width=14)]
    for who in ("tandem", "torch"):
        cols += [common.Column(f"{who}:time", "(us)", 12, ".1f"), common.Column("algbw", "(GB/s)", 8, ".2f"),
                 common.Column("busbw", "(GB/s)", 8, ".2f"), common.Column("#wrong", width=7)]
    cols.append(common.Column("busbw_ratio", "(x)", 11, ".3f"))
    table = common.Table(cols)
    if rank == 0:
        common.print_header(f"tandem.comm vs torch.distributed, {n} rank(s)", env)
        print(table.header(), flush=True)

    results = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for op in ops:
        size = lo
        while size <= hi:
            count = max(1, size // elem)
            case = Case(op, count, dtype, device, comm, rank, n)
            wrong = [case.wrong_after(case.tandem), case.wrong_after(case.torch)]
            times = [common.benchmark(fn, device=device, warmup=warmup, iters=iters).median_ms
                     for fn in (case.tandem, case.torch)]
            stats = torch.tensor(times + wrong, dtype=torch.float64)
            dist.all_reduce(stats[:2], op=dist.ReduceOp.MAX)  # the slowest rank sets the time
            dist.all_reduce(stats[2:], op=dist.ReduceOp.SUM)
            t_ours, t_theirs, w_ours, w_theirs = stats.tolist()
            key = "send_recv" if op == "sendrecv" else op
            row = dict(op=op, bytes=case.nbytes, count=count, dtype=env["dtype"], tandem_us=t_ours * 1e3,
                       torch_us=t_theirs * 1e3, wrong_tandem=int(w_ours), wrong_torch=int(w_theirs))
            for who, t in (("tandem", t_ours), ("torch", t_theirs)):
                row[f"{who}_algbw"] = common.algbw_gbps(case.nbytes, t)
                row[f"{who}_busbw"] = common.busbw_gbps(key, case.nbytes, t, n)
            row["busbw_ratio"] = row["tandem_busbw"] / row["torch_busbw"] if row["torch_busbw"] else None
            results.append(row)
            if rank == 0:
                print(table.row([case.nbytes, count, env["dtype"], op,
                                 row["tandem_us"], row["tandem_algbw"], row["tandem_busbw"], row["wrong_tandem"],
                                 row["torch_us"], row["torch_algbw"], row["torch_busbw"], row["wrong_torch"],
                                 row["busbw_ratio"]]), flush=True)
            size *= args.stepfactor

    targets = []
    big = [r for r in results if r["op"] == "all_reduce" and r["bytes"] >= 64 << 20]
    small = [r for r in results if r["op"] == "sendrecv" and r["bytes"] == 4096]
    if n > 1 and big:
        targets.append(common.target_line("all_reduce busbw / torch's, worst size >= 64 MiB",
                                          min(r["busbw_ratio"] for r in big), 0.95))
    if n > 1 and small:  # time <= 1.2 x torch's  <=>  torch/tandem >= 1/1.2
        targets.append(common.target_line("4 KiB sendrecv: torch time / tandem time",
                                          small[0]["torch_us"] / small[0]["tandem_us"], 1 / 1.2))
    wrong = sum(r["wrong_tandem"] + r["wrong_torch"] for r in results)
    notes = ("# targets not checked: with one rank the operations are local copies",) if n == 1 else ()
    common.report("bench_comm", args, env, results, targets, rank=rank, wrong=wrong, notes=notes,
                  speedups=[], skipped_shapes=[])
    dist.barrier()
    dist.destroy_process_group()
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
