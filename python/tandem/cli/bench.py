"""`tandem bench`: the microbenchmark suite (benchmarks/*.py) behind one front door.

Each suite runs its script (under torch's launcher when it needs several ranks) and prints
its nccl-tests-style table; --json keeps one JSON file per suite and --plot draws PNGs from
them (busbw vs size, TFLOP/s vs shape, bubble vs microbatches, ...).
"""

import os
import subprocess
import sys
import tempfile

from tandem.cli import common

# suite: (script, ranks, extra arguments, extra arguments with --quick)
SUITES = {
    "gemm": ("bench_linear_gelu.py", 1, [], ["--quick"]),
    "comm": ("bench_comm.py", 2, ["--ops", "all_reduce,all_gather,reduce_scatter"], ["-e", "256K"]),
    "p2p": ("bench_comm.py", 2, ["--ops", "sendrecv"], ["-e", "256K"]),
    "overlap": ("bench_overlap.py", 2, [], ["--tokens", "256", "--out-features", "256", "--chunks", "1,2,4"]),
    "tp": ("bench_tp.py", 2, [], ["--quick"]),
    "pipeline": ("bench_pipeline.py", 2, [], ["--microbatches", "2", "4", "--layers", "2", "--hidden", "64"]),
    # one process that starts a gloo world per layout (tp1, tp2, pp2, tp2xpp2) itself
    "generate": ("bench_generate.py", 1, [], ["--quick"]),
    "memory": ("bench_memory.py", 4, [], ["--quick"]),
    "zero": ("bench_zero.py", 2, [], ["--quick"]),
}


def add_parser(sub):
    p = sub.add_parser("bench", help="microbenchmarks: gemm, comm, p2p, overlap, tp, pipeline, generate, memory, zero, all")
    p.add_argument("suite", choices=[*SUITES, "all"])
    p.add_argument("--quick", action="store_true", help="small sizes (a CPU runs each suite in seconds)")
    p.add_argument("--json", metavar="DIR", nargs="?", const="runs/bench",
                   help="write one JSON file per suite into DIR (default runs/bench)")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks of the multi-rank suites (default 2; generate starts the ranks of its layouts itself)")
    p.set_defaults(run=run)


def _benchmarks_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "..", "..", "..", "benchmarks"), os.path.join(os.getcwd(), "benchmarks")):
        if os.path.exists(os.path.join(candidate, "common.py")):
            return os.path.abspath(candidate)
    raise common.UsageError("benchmarks/ not found: run `tandem bench` from a tandem source checkout")


def run(args) -> int:
    try:
        root = _benchmarks_dir()
        if args.nproc is not None and args.nproc < 1:
            raise common.UsageError(f"--nproc must be >= 1, got {args.nproc}")
    except common.UsageError as e:
        common.fail(str(e))
    json_dir = args.json or (tempfile.mkdtemp(prefix="tandem-bench-") if args.plot else None)
    rc, written = 0, {}
    for name in (list(SUITES) if args.suite == "all" else [args.suite]):
        script, ranks, extra, quick = SUITES[name]
        cmd_args = [*extra, *(quick if args.quick else [])]
        if json_dir:
            os.makedirs(json_dir, exist_ok=True)
            written[name] = os.path.join(json_dir, f"{name}.json")
            cmd_args += ["--json", written[name]]
        nproc = args.nproc or ranks
        path = os.path.join(root, script)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd = [*launcher, path, *cmd_args] if ranks > 1 else [sys.executable, path, *cmd_args]
        print(f"# tandem bench {name}: {' '.join(cmd[1:])}", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        code = subprocess.call(cmd, env=env)
        if code:
            print(f"# tandem bench {name}: exit code {code}", file=sys.stderr)
            rc = rc or code
    if args.plot:
        from tandem.cli.bench_plots import plot_all

        for png in plot_all({k: v for k, v in written.items() if os.path.exists(v)}, args.plot):
            print(f"# plot: {png}")
    return rc
