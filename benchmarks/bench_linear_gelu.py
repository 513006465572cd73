"""Fused linear+bias+GeLU against its peers, forward, backward and forward+backward.

Variants, on the same random inputs:
  fused      tandem.ops.linear_bias_gelu (on CUDA: one cuBLASLt matmul with a GeLU epilogue)
  unfused    F.gelu(F.linear(x, w, b), approximate)
  addmm_act  torch._addmm_activation(b, x, w.T, use_gelu=True): forward only (no autograd)
  gemm       F.linear(x, w): the GEMM alone, the ceiling of the fused forward

Shapes: tokens M in {4096, 16384}; (K, N) = (4096, 14336/tp) and (8192, 28672/tp) for tp in
{1, 2, 4, 8}: the MLP up-projection shards of 8B- and 70B-class models. --quick runs the same
grid scaled down 32x, which takes seconds on a CPU.

Each variant is checked once against a float64 reference before it is timed (#wrong: the
elements of the output and of every gradient beyond rounding, see common.count_wrong).
Times are medians of --iters runs after --warmup runs; "bwd" is the backward alone (autograd
over a retained graph), "f+b" a forward and a backward. FLOPs count the GEMMs only:
2MNK forward, 4MNK backward. Speedups are peer time / fused time, from the same run.

Usage: python benchmarks/bench_linear_gelu.py [--quick] [--device cuda|cpu] [--dtype bf16]
           [--warmup N] [--iters N] [--json PATH] [--time-budget SECONDS]
Exit status: 1 if any #wrong is non-zero, else 0 (targets missed are reported, not failed).
"""

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import common

VARIANTS = ("fused", "unfused", "addmm_act", "gemm")
DIFFERENTIABLE = ("fused", "unfused", "gemm")

# (key, description, target, unit): speedup = peer time / fused time;
# fraction of the GEMM = fused TFLOP/s / GEMM TFLOP/s = GEMM time / fused time
TARGETS = (
    ("fwd_vs_unfused", "fused fwd speedup over unfused fwd (median)", 1.10, "x"),
    ("fwd_vs_addmm", "fused fwd speedup over torch._addmm_activation (median)", 0.97, "x"),
    ("fwd_frac_gemm", "fused fwd TFLOP/s as a fraction of the plain GEMM's (median)", 0.90, ""),
    ("bwd_vs_unfused", "fused bwd speedup over unfused bwd (median)", 1.15, "x"),
)


@dataclass(frozen=True)
class Shape:
    m: int  # tokens
    k: int  # in_features
    n: int  # out_features of this tp shard
    tp: int


def shapes(quick: bool) -> list:
    scale = 32 if quick else 1
    grid = []
    for m in (4096, 16384):
        for k, n in ((4096, 14336), (8192, 28672)):
            for tp in (1, 2, 4, 8):
                grid.append(Shape(m // scale, k // scale, n // tp // scale, tp))
    return grid


def forward_fn(variant: str, approximate: str):
    """The variant's forward as f(x, w, b)."""
    if variant == "fused":
        import tandem
        return lambda x, w, b: tandem.ops.linear_bias_gelu(x, w, b, approximate)
    if variant == "unfused":
        return lambda x, w, b: F.gelu(F.linear(x, w, b), approximate=approximate)  # (M,K)@(K,N)+b, gelu
    if variant == "addmm_act":
        return lambda x, w, b: torch._addmm_activation(b, x, w.t(), use_gelu=True)
    if variant == "gemm":
        return lambda x, w, b: F.linear(x, w)  # (M,K)@(K,N), no bias
    raise ValueError(variant)


def addmm_gelu_kind(device: torch.device) -> str:
    """Which GeLU torch._addmm_activation computes here: cuBLASLt's epilogue is the tanh
    form, the CPU kernel uses erf. Probed in float32, where the two differ ~100x the rounding."""
    g = torch.Generator(device=device).manual_seed(1)
    x, w, b = (torch.randn(s, generator=g, device=device) for s in ((64, 32), (48, 32), (48,)))
    got = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    pre = F.linear(x, w, b)
    err = {kind: (got - F.gelu(pre, approximate=kind)).abs().max().item() for kind in ("tanh", "none")}
    return min(err, key=err.get)


# ---------------------------------------------------------------------------------------
# checking

def leaves_of(variant: str, x, w, b) -> list:
    return [x, w] if variant == "gemm" else [x, w, b]


def reference(kind: str, x, w, b, grad_out):
    """float64 output and gradients; kind is "gemm" or a GeLU approximation."""
    xs = [t.detach().double().requires_grad_() for t in ([x, w] if kind == "gemm" else [x, w, b])]
    pre = F.linear(*xs)
    out = pre if kind == "gemm" else F.gelu(pre, approximate=kind)
    grads = torch.autograd.grad(out, xs, grad_out.double())
    return out.detach(), grads


def wrong_of(variant: str, fwd, x, w, b, grad_out, ref) -> int:
    """Elements of the output and gradients that differ from the reference beyond rounding."""
    m, k = x.shape
    n = w.shape[0]
    ref_out, ref_grads = ref
    with torch.no_grad():
        wrong = common.count_wrong(fwd(x, w, b), ref_out, dtype=x.dtype, reduction=k)
    if variant in DIFFERENTIABLE:
        xs = [t.detach().requires_grad_() for t in leaves_of(variant, x, w, b)]
        out = fwd(xs[0], xs[1], xs[2] if len(xs) == 3 else None)
        grads = torch.autograd.grad(out, xs, grad_out, allow_unused=True)
        for got, want, red in zip(grads, ref_grads, (n, m, m)):  # dx sums over N, dw and db over M
            wrong += want.numel() if got is None else common.count_wrong(got, want, dtype=x.dtype, reduction=red)
    return wrong


# ---------------------------------------------------------------------------------------
# timing

def measure(variant: str, fwd, x, w, b, grad_out, device, warmup: int, iters: int) -> dict:
    """Median ms of forward (no grad), backward (retained graph) and forward+backward."""
    run = dict(device=device, warmup=warmup, iters=iters)
    with torch.no_grad():
        times = {"fwd": common.benchmark(lambda: fwd(x, w, b), **run).median_ms}
    if variant not in DIFFERENTIABLE:
        return {**times, "bwd": None, "fwdbwd": None}
    xs = [t.detach().requires_grad_() for t in leaves_of(variant, x, w, b)]
    bias = None if variant == "gemm" else xs[2]
    out = fwd(xs[0], xs[1], bias)
    times["bwd"] = common.benchmark(
        lambda: torch.autograd.grad(out, xs, grad_out, retain_graph=True), **run).median_ms
    del out
    times["fwdbwd"] = common.benchmark(
        lambda: torch.autograd.grad(fwd(xs[0], xs[1], bias), xs, grad_out), **run).median_ms
    return times


def run_shape(shape: Shape, args, device, dtype, addmm_kind: str) -> list:
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rand = lambda *s, scale=1.0: common.random_tensor(s, dtype=dtype, device=device, generator=gen, scale=scale)
    x = rand(shape.m, shape.k)
    w = rand(shape.n, shape.k, scale=shape.k ** -0.5)  # pre-activations ~ N(0, 2): GeLU's curved range
    b = rand(shape.n)
    grad_out = rand(shape.m, shape.n)
    fwds = {v: forward_fn(v, args.approximate) for v in VARIANTS}
    kind_of = {"fused": args.approximate, "unfused": args.approximate, "addmm_act": addmm_kind, "gemm": "gemm"}

    wrong = {}
    for kind in dict.fromkeys(kind_of.values()):  # one float64 reference at a time (memory)
        ref = reference(kind, x, w, b, grad_out)
        for v in VARIANTS:
            if kind_of[v] == kind:
                wrong[v] = wrong_of(v, fwds[v], x, w, b, grad_out, ref)
        del ref
        if device.type == "cuda":
            torch.cuda.empty_cache()

    flops = {"fwd": 2 * shape.m * shape.n * shape.k, "bwd": 4 * shape.m * shape.n * shape.k}
    flops["fwdbwd"] = flops["fwd"] + flops["bwd"]
    rows = []
    for v in VARIANTS:
        t = measure(v, fwds[v], x, w, b, grad_out, device, args.warmup, args.iters)
        row = {**asdict(shape), "variant": v, "wrong": wrong[v]}
        for p in ("fwd", "bwd", "fwdbwd"):
            row[f"{p}_ms"] = t[p]
            row[f"{p}_tflops"] = common.tflops(flops[p], t[p])
        rows.append(row)
    return rows


def speedups(rows: list) -> dict:
    """Per-shape ratios, peer time / fused time."""
    by = {r["variant"]: r for r in rows}
    fused = by["fused"]
    ratio = lambda peer, p: (by[peer][f"{p}_ms"] / fused[f"{p}_ms"]
                             if by[peer][f"{p}_ms"] is not None and fused[f"{p}_ms"] else None)
    return {k: v for k, v in rows[0].items() if k in ("m", "k", "n", "tp")} | {
        "fwd_vs_unfused": ratio("unfused", "fwd"),
        "fwd_vs_addmm": ratio("addmm_act", "fwd"),
        "fwd_frac_gemm": ratio("gemm", "fwd"),
        "bwd_vs_unfused": ratio("unfused", "bwd"),
        "fwdbwd_vs_unfused": ratio("unfused", "fwdbwd"),
    }


# ---------------------------------------------------------------------------------------
# report

SHAPE_COLS = [common.Column("M", "", 6, "d"), common.Column("K", "", 6, "d"),
              common.Column("N", "", 6, "d"), common.Column("tp", "", 3, "d")]
TIMES = common.Table(SHAPE_COLS + [
    common.Column("variant", "", 10),
    common.Column("fwd", "(ms)", 9), common.Column("TFLOP/s", "", 8, ".2f"),
    common.Column("bwd", "(ms)", 9), common.Column("TFLOP/s", "", 8, ".2f"),
    common.Column("f+b", "(ms)", 9), common.Column("TFLOP/s", "", 8, ".2f"),
    common.Column("#wrong", "", 7, "d"),
])
RATIOS = common.Table(SHAPE_COLS + [
    common.Column("fwd/unfused", "(x)", 12), common.Column("fwd/addmm", "(x)", 10),
    common.Column("fwd/gemm", "(frac)", 9), common.Column("bwd/unfused", "(x)", 12),
    common.Column("f+b/unfused", "(x)", 12),
])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, warmup=None, iters=None)  # 5 and 20; 2 and 10 with --quick
    parser.add_argument("--quick", action="store_true", help="the shape grid scaled down 32x (seconds on a CPU)")
    parser.add_argument("--approximate", default="tanh", choices=("tanh", "none"), help="GeLU form (default tanh)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new shape after this many seconds (the rest are reported as skipped)")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.iters = args.iters if args.iters is not None else (10 if args.quick else 20)
    device = common.resolve_device(args.device)
    dtype = common.DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    addmm_kind = addmm_gelu_kind(device)
    grid = shapes(args.quick)
    env = common.environment(device, dtype=dtype, warmup=args.warmup, iters=args.iters,
                             approximate=args.approximate, addmm_act_gelu=addmm_kind,
                             shapes=f"{len(grid)} ({'quick' if args.quick else 'full'})")
    common.print_header("tandem bench_linear_gelu: fused linear+bias+GeLU vs unfused, addmm_activation, GEMM", env)

    start = time.monotonic()
    results, ratios, skipped = [], [], []
    print(TIMES.header(), flush=True)
    for shape in grid:
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            skipped.append(asdict(shape))
            continue
        rows = run_shape(shape, args, device, dtype, addmm_kind)
        for r in rows:
            print(TIMES.row([r["m"], r["k"], r["n"], r["tp"], r["variant"], r["fwd_ms"], r["fwd_tflops"],
                             r["bwd_ms"], r["bwd_tflops"], r["fwdbwd_ms"], r["fwdbwd_tflops"], r["wrong"]]),
                  flush=True)
        results += rows
        ratios.append(speedups(rows))

    print("#\n" + RATIOS.header())
    for s in ratios:
        print(RATIOS.row([s["m"], s["k"], s["n"], s["tp"], s["fwd_vs_unfused"], s["fwd_vs_addmm"],
                          s["fwd_frac_gemm"], s["bwd_vs_unfused"], s["fwdbwd_vs_unfused"]]))
    wrong = sum(r["wrong"] for r in results)
    print("#")
    if skipped:
        print(f"# time budget of {args.time_budget:g} s reached: {len(skipped)} of {len(grid)} shapes skipped")
    print(f"# targets (one H100/H200, bf16); medians over {len(ratios)} shapes, this run: {device.type} {env['dtype']}")
    summary = []
    for key, description, target, unit in TARGETS:
        values = [s[key] for s in ratios if s[key] is not None]
        line = common.target_line(description, statistics.median(values) if values else None, target, unit)
        summary.append({"key": key, **line})
        print(line["line"])
    print(f"# wrong values: {wrong} {'OK' if wrong == 0 else 'FAILED'}", flush=True)
    if args.json:
        common.write_json(args.json, benchmark_name="bench_linear_gelu", env=env, results=results,
                          speedups=ratios, targets=summary, skipped_shapes=skipped, wrong=wrong)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
