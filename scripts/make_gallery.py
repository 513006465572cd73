"""Draw the built-in pipeline schedules for docs/pipeline.md and print their figures.

    python scripts/make_gallery.py [--ranks 4] [--microbatches 8] [--out docs/img]

Each schedule is lowered and dry-run with unit costs (F = B = W = 1, so a full backward
costs 2) and drawn to <out>/pipeline_<name>.svg; the table printed at the end (bubble
fraction, makespan, peak in-flight microbatches) is the one in docs/pipeline.md.
"""

import argparse
import pathlib

from tandem.pipeline import (GPipe, Interleaved1F1B, OneFOneB, ZeroBubbleH1, render,
                             simulate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="pipeline ranks p")
    parser.add_argument("--microbatches", type=int, default=8, help="microbatches m")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/img"))
    parser.add_argument("--format", choices=("svg", "png"), default="svg")
    args = parser.parse_args()
    p, m = args.ranks, args.microbatches
    schedules = {
        "gpipe": GPipe(p, m),
        "1f1b": OneFOneB(p, m),
        "interleaved_1f1b_v2": Interleaved1F1B(p, m, virtual_stages=2),
        "zb_h1": ZeroBubbleH1(p, m),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for slug, sched in schedules.items():
        result = simulate(sched)
        path = render(sched, args.out / f"pipeline_{slug}.{args.format}")
        per_rank = {}
        for stage, count in result.peak_in_flight.items():
            rank = sched.layout.rank_of(stage)
            per_rank[rank] = per_rank.get(rank, 0) + count
        rows.append((type(sched).__name__ + (f" (v={sched.virtual_stages})"
                                             if sched.virtual_stages > 1 else ""),
                     result.bubble_fraction, result.makespan,
                     result.peak_in_flight[0], max(per_rank.values()), path))
    print(f"p={p}, m={m}, unit costs (F = B = W = 1; a full backward costs 2)\n")
    print("| schedule | bubble | makespan | in flight, stage 0 | in flight, busiest rank "
          "(stage units) | picture |")
    print("|---|---|---|---|---|---|")
    for name, bubble, makespan, stage0, rank_max, path in rows:
        print(f"| {name} | {bubble:.1%} ({bubble:.4f}) | {makespan:g} | {stage0} | "
              f"{rank_max} | {path} |")


if __name__ == "__main__":
    main()
