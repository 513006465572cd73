"""`tandem bench`: the microbenchmark suite (benchmarks/*.py) behind one front door."""

import os
import subprocess
import sys

from tandem.cli import common

SUITES = {
    "gemm": ("bench_linear_gelu.py", 1),
    "comm": ("bench_comm.py", 2),
    "overlap": ("bench_overlap.py", 2),
    "p2p": ("bench_comm.py", 2),
    "tp": ("bench_tp.py", 2),
    "pipeline": ("bench_pipeline.py", 2),
}


def add_parser(sub):
    p = sub.add_parser("bench", help="microbenchmarks: gemm, comm, overlap, p2p, tp, pipeline, all")
    p.add_argument("suite", choices=[*SUITES, "all"])
    p.add_argument("--quick", action="store_true", help="small sizes (CPU in seconds)")
    p.add_argument("--json", metavar="DIR", help="write one JSON file per suite into DIR")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--nproc", type=int, default=None, help="processes for multi-rank suites (default 2)")
    p.set_defaults(run=run)


def _benchmarks_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "..", "..", "..", "benchmarks"), os.path.join(os.getcwd(), "benchmarks")):
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    raise common.UsageError("benchmarks/ not found: run `tandem bench` from a tandem source checkout")


def run(args) -> int:
    try:
        root = _benchmarks_dir()
    except common.UsageError as e:
        common.fail(str(e))
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    rc = 0
    for name in dict.fromkeys(SUITES[s][0] for s in suites):
        script = os.path.join(root, name)
        if not os.path.exists(script):
            print(f"tandem bench: {name} is not in this checkout; skipped", file=sys.stderr)
            rc = rc or 1
            continue
        nproc = args.nproc or max(SUITES[s][1] for s in suites if SUITES[s][0] == name)
        extra = ["--quick"] if args.quick else []
        if args.json:
            os.makedirs(args.json, exist_ok=True)
            extra += ["--json", os.path.join(args.json, name.replace(".py", ".json"))]
        if args.plot:
            extra += ["--plot", args.plot]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   script, *extra]
        else:
            cmd = [sys.executable, script, *extra]
        print(f"# tandem bench: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))) or rc
    return rc
