"""Tensor-parallel MLP and attention: tandem vs PyTorch's own TP, forward + backward.

Run under torchrun; the TP degree is the world size (run it once per tp):

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --quick          # CPU, gloo
    torchrun --nproc-per-node 8 benchmarks/bench_tp.py --dtype bf16     # GPUs, NCCL

tandem: ParallelMLP / ParallelSelfAttention. PyTorch: the same nn.Linear model converted
with torch.distributed.tensor.parallel.parallelize_module (ColwiseParallel for fc1 and
q/k/v, RowwiseParallel for fc2 and o). Both get the same full weights and inputs; outputs
are checked against each other (#wrong) before timing. Ratio = tandem / PyTorch step time
(lower is better; target <= 0.90).
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class MLP(nn.Module):
    def __init__(self, h, ffn):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """q/k/v/o projections named like tandem's; heads derived from the (sharded) width."""

    def __init__(self, h, heads):
        super().__init__()
        self.hd = h // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


def _torch_tp(module, kind, device_mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()} if kind == "mlp" else {
        "q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
        "o_proj": RowwiseParallel()}
    return parallelize_module(module, device_mesh, plan)


def _tandem(kind, h, ffn, heads, mesh, full, device, dtype):
    from tandem.nn import ParallelMLP, ParallelSelfAttention

    if kind == "mlp":
        mod = ParallelMLP(h, ffn, mesh=mesh, device="meta", dtype=dtype)
    else:
        mod = ParallelSelfAttention(h, heads, mesh=mesh, device="meta", dtype=dtype)
    mod = mod.to_empty(device=device)
    mod.load_full_state_dict(full)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, warmup=None, iters=None)
    p.add_argument("--quick", action="store_true", help="small shapes (CPU in seconds)")
    args = p.parse_args(argv)

    import tandem
    from torch.distributed.device_mesh import DeviceMesh

    device = common.resolve_device(args.device if args.device else (
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"))
    dtype = common.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh = tandem.init_mesh(tp=world)
    device_mesh = DeviceMesh.from_group(mesh.tp_group, device.type)
    quick = args.quick or device.type == "cpu"
    warmup = args.warmup if args.warmup is not None else (2 if quick else 10)
    iters = args.iters if args.iters is not None else (5 if quick else 30)
    # (batch, seq, hidden, ffn, heads): 8B-class shapes on GPUs, small ones on CPU
    shapes = [(2, 64, 256, 1024, 8)] if quick else [(4, 2048, 4096, 14336, 32), (1, 4096, 8192, 28672, 64)]
    env = common.environment(device, dtype=dtype, warmup=warmup, iters=iters, world_size=world, tp=world)
    rank0 = mesh.rank == 0
    table = common.Table([common.Column("module", width=10), common.Column("tp", width=4),
                          common.Column("tokens", width=8), common.Column("hidden", width=7),
                          common.Column("tandem", "ms", 10), common.Column("torch_tp", "ms", 10),
                          common.Column("ratio", "x", 7), common.Column("#wrong", width=7)])
    if rank0:
        common.print_header(f"tandem TP vs PyTorch TP, forward+backward, tp={world}", env)
        print(table.header())
    results, gen = [], torch.Generator(device="cpu").manual_seed(args.seed)
    for b, s, h, ffn, heads in shapes:
        for kind in ("mlp", "attention"):
            torch.manual_seed(args.seed)
            plain = (MLP(h, ffn) if kind == "mlp" else Attention(h, heads)).to(device=device, dtype=dtype)
            full = {k: v.detach().clone() for k, v in plain.state_dict().items()}
            ours = _tandem(kind, h, ffn, heads, mesh, full, device, dtype)
            theirs = _torch_tp(plain, kind, device_mesh)
            x = common.random_tensor((b, s, h), dtype=dtype, device=device, generator=gen)
            g = common.random_tensor((b, s, h), dtype=dtype, device=device, generator=gen)
            with torch.no_grad():
                wrong = common.count_wrong(ours(x), theirs(x).float(), dtype=dtype, reduction=ffn if kind == "mlp" else h)

            def step(mod):
                xi = x.detach().requires_grad_()
                mod(xi).backward(g)

            t_ours = common.benchmark(lambda: step(ours), device=device, warmup=warmup, iters=iters).median_ms
            t_theirs = common.benchmark(lambda: step(theirs), device=device, warmup=warmup, iters=iters).median_ms
            # the slowest rank sets the step time
            times = torch.tensor([t_ours, t_theirs], dtype=torch.float64)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            t_ours, t_theirs = times.tolist()
            row = dict(module=kind, tp=world, tokens=b * s, hidden=h, tandem_ms=t_ours, torch_tp_ms=t_theirs,
                       ratio=t_ours / t_theirs, wrong=wrong)
            results.append(row)
            if rank0:
                print(table.row([kind, world, b * s, h, t_ours, t_theirs, t_ours / t_theirs, wrong]), flush=True)
    if rank0:
        worst = max(r["ratio"] for r in results)  # tandem time <= 0.90 x PyTorch's, i.e. speedup >= 1.11x
        verdict = common.target_line(f"speedup over PyTorch TP, worst config, tp={world}", 1 / worst, 1 / 0.9)
        print(verdict["line"])
        if args.json:
            common.write_json(args.json, benchmark_name="bench_tp", env=env, results=results, targets=[verdict],
                              wrong=sum(r["wrong"] for r in results))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if all(r["wrong"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
