"""Host time of one NCCL all-reduce post, on CPU, with a scripted NCCL.

What a post costs the host in tandem's NCCL backend: the communicator's lock, ncclGroupStart,
the call, ncclGroupEnd and the poll until NCCL answers ncclSuccess (a non-blocking
communicator answers ncclInProgress until the group was launched). The NCCL calls are the
scripted ones of csrc/comm/fake_nccl.h: the group's launch takes `launch` microseconds, on a
thread of its own per group as NCCL 2.30.7 does (`thread`), or as a plain delay. Two poll
policies: the old one (sleep 1, 2, 4, ... us from the first look; a 1 us sleep costs ~55 us
with Linux's timer slack) and the current one (yield the core for the first 50 us, then
sleep). Not measured: the CUDA event record and stream wait around the post (GPU only).

    python benchmarks/bench_nccl_post.py [--posts 2000] [--repeats 3] [--json out.json]
"""

import argparse
import json
import os
import platform
import statistics

import torch

from tandem import _C

LAUNCH_US = (0.0, 5.0, 20.0, 100.0)
POLICIES = {"sleep_from_1us": 0.0, "yield_50us_then_sleep": 50.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--posts", type=int, default=2000, help="posts per run (the median is kept)")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell (the median of their medians)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if not hasattr(_C._testing, "bench_nccl_post"):
        raise SystemExit("bench_nccl_post: this core was built without the NCCL backend")
    print(f"# tandem bench_nccl_post: torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; median host microseconds per post over {args.posts} posts, "
          f"median of {args.repeats} runs")
    print(f"# {'launch_us':>9} {'thread':>6} " + " ".join(f"{name:>22}" for name in POLICIES))
    rows = []
    for thread in (True, False):
        for launch in LAUNCH_US:
            row = {"launch_us": launch, "thread": thread}
            for name, spin in POLICIES.items():
                row[name] = statistics.median(_C._testing.bench_nccl_post(args.posts, launch, thread, spin)
                                              for _ in range(args.repeats))
            rows.append(row)
            print(f"  {launch:9.0f} {str(thread):>6} " + " ".join(f"{row[n]:22.1f}" for n in POLICIES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "posts": args.posts, "repeats": args.repeats}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
