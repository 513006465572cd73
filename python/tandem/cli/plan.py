"""`tandem plan`: choose tp, pp, dp, microbatches, schedule and recomputation for a model on N
GPUs, or estimate one layout, or calibrate a profile of this machine (tandem.plan)."""

from __future__ import annotations

import json
import sys

from tandem.cli import common


def add_parser(sub):
    p = sub.add_parser("plan", help="choose a TP x PP x DP layout (memory and step-time models)")
    p.add_argument("--model", help="preset name, tandem GPTConfig JSON, or Hugging Face config.json (or its dir)")
    p.add_argument("--gpus", type=int, help="GPUs in all (default with --layout: tp*pp*dp)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node, the NVLink domain (default: the profile's)")
    p.add_argument("--gpu", default="H100-SXM", help="A100-80GB, H100-SXM, H200, or a profile JSON")
    p.add_argument("--global-batch", type=int, help="sequences per step")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--top", type=int, default=5, help="layouts to rank")
    p.add_argument("--layout", help="estimate one layout, e.g. tp=8,pp=2,dp=32,mb=2,schedule=interleaved:v=5,"
                   "recompute=full")
    p.add_argument("--explain", metavar="LAYOUT", help="say why the search drops LAYOUT")
    p.add_argument("--framework", default="tandem", choices=["tandem", "megatron-sc21"],
                   help="whose runs to model (megatron-sc21: Megatron-LM as in Narayanan et al. 2021)")
    p.add_argument("--tp-across-nodes", action="store_true", help="let tp span nodes")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--plot", metavar="DIR", help="write memory.png and schedule.png of the winner to DIR")
    p.add_argument("--calibrate", metavar="OUT.json", help="measure this machine into a profile for --gpu")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the calibration's collectives (default 2)")
    p.set_defaults(run=run)


def _positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _inputs(args):
    from tandem.plan import PlanError, load_model, load_profile

    if not args.model:
        raise common.UsageError("--model is required (a preset, a GPTConfig JSON or a config.json)")
    if args.global_batch is None:
        raise common.UsageError("--global-batch is required")
    _positive(args, "gpus", "gpus_per_node", "global_batch", "seq_len", "top")
    try:
        model, profile = load_model(args.model), load_profile(args.gpu)
    except (ValueError, TypeError, PlanError) as e:
        raise common.UsageError(str(e))
    return model, profile, args.seq_len or model.max_seq_len


def _calibrate(args) -> int:
    from tandem.plan.calibrate import calibrate

    profile = calibrate(nproc=args.nproc)
    profile.to_json(args.calibrate)
    print(f"wrote {args.calibrate}: {profile.name}")
    for line in profile.source.split("; "):
        print(f"  {line}")
    return 0


def run(args) -> int:
    from tandem.plan import Layout, PlanError, estimate
    from tandem.plan.report import command, estimate_json, format_estimate, format_table, plan_json, reasons
    from tandem.plan.search import explain, plan

    try:
        if args.calibrate:
            _positive(args, "nproc")
            return _calibrate(args)
        model, profile, seq_len = _inputs(args)
        common_kw = dict(global_batch=args.global_batch, seq_len=seq_len, precision=args.precision,
                         gpus_per_node=args.gpus_per_node, framework=args.framework,
                         tp_across_nodes=args.tp_across_nodes)
        if args.explain:
            layout = Layout.parse(args.explain)
            why = explain(model, layout, gpus=args.gpus or layout.gpus, gpu=profile, **common_kw)
            print(f"{layout}: " + ("runs and fits" if not why else "dropped:\n  " + "\n  ".join(why)))
            return 0
        if args.layout:
            layout = Layout.parse(args.layout)
            if args.gpus is not None and args.gpus != layout.gpus:
                raise common.UsageError(f"--layout uses tp*pp*dp = {layout.gpus} GPUs, not --gpus {args.gpus}")
            result = estimate(model, layout, profile, **common_kw)
            if args.json:
                print(json.dumps(estimate_json(result), indent=1))
            else:
                print(format_estimate(result))
            if args.plot:
                from tandem.plan.plot import plot_estimate

                for path in plot_estimate(result, args.plot):
                    print(f"# plot: {path}", file=sys.stderr if args.json else sys.stdout)
            return 0
        if args.gpus is None:
            raise common.UsageError("--gpus is required (or give --layout)")
        result = plan(model, gpus=args.gpus, gpu=profile, top=args.top, **common_kw)
    except (PlanError, ValueError) as e:
        common.fail(str(e))
    except common.UsageError as e:
        common.fail(str(e))
    if args.json:
        print(json.dumps(plan_json(result), indent=1))
    else:
        _print_plan(result, format_table, reasons, command)
    if args.plot:
        from tandem.plan.plot import plot_estimate

        for path in plot_estimate(result.best, args.plot):
            print(f"# plot: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _print_plan(result, format_table, reasons, command) -> None:
    m = result.model
    print(f"{m.name} ({m.num_params() / 1e9:.1f}B parameters) on {result.num_gpus} x {result.profile.name}, "
          f"{result.gpus_per_node} per node; global batch {result.global_batch} x {result.seq_len} tokens, "
          f"{result.precision}")
    print(f"searched {result.enumerated} layouts: {result.runnable} can run, {result.fitting} fit in memory "
          f"(best of each tp/pp/dp/mb/schedule); the {len(result.ranked)} best simulated "
          f"({result.seconds:.1f} s)")
    print(format_table(result))
    print("why #1:")
    for line in reasons(result):
        print(f"  - {line}")
    cmd, notes = command(result.best)
    print("run it:")
    print(f"  {cmd}")
    for note in notes:
        print(f"  note: {note}")
