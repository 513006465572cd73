"""tandem plan against tandem's own runs on CPU: a profile calibrated on this machine
predicts the step time of `tandem train` at tp=2 x pp=2 (1F1B and ZB-H1) within 25% and its
bubble within 10% (relative), both measured as the median over the steps after warm-up.

The calibration, the runs and the estimates always run (and are checked for what does not
depend on the machine's speed); the timing bounds are asserted with TANDEM_TIMED_TESTS=1 on
an idle machine: on the shared 2-core VM gloo's latencies drift 2-3x within a minute.
`tandem plan --calibrate` itself is checked end to end (the profile it writes plans)."""

import os
import statistics

import pytest

from distributed import run_ranks
from plan_cpu_run import BATCH, MICROBATCHES, MODEL, train_and_time

STEPS, WARMUP = 30, 2  # the median of 28 steps: one step's bubble moves by +-0.04


TIMED = os.environ.get("TANDEM_TIMED_TESTS") == "1"


def test_calibrated_cpu_profile_predicts_tandem_train():
    from tandem.models import GPTConfig
    from tandem.pipeline import TimelineRecord, bubble_fraction
    from tandem.plan import Layout, estimate, load_model
    from tandem.plan.calibrate import profile_from_measurements

    results = run_ranks(4, train_and_time, ("1f1b", "zb-h1"), STEPS, timeout=600)
    profile = profile_from_measurements([m for r in results for m in r["measured"]], nproc=4)
    model = load_model(GPTConfig(**MODEL))
    rows, failures = [f"profile: {profile.source}"], []
    for schedule, run in results[0]["runs"].items():
        measured = statistics.median(run["step_s"][WARMUP:])
        bubble = statistics.median(bubble_fraction([TimelineRecord(*r) for r in tl])
                                   for tl in run["timelines"][WARMUP:])
        est = estimate(model, Layout(tp=2, pp=2, microbatch=BATCH // MICROBATCHES, schedule=schedule), profile,
                       global_batch=BATCH, seq_len=MODEL["max_seq_len"], precision="fp32", gpus_per_node=4)
        t_gap, b_gap = est.step_time / measured - 1, est.bubble / bubble - 1
        rows.append(f"{schedule}: step measured {measured * 1e3:.1f} ms (steps "
                    f"{[round(t * 1e3) for t in run['step_s']]}), predicted {est.step_time * 1e3:.1f} ms "
                    f"({t_gap:+.1%}); bubble measured {bubble:.3f}, predicted {est.bubble:.3f} ({b_gap:+.1%}); "
                    f"cores shared: slowdown {est.slowdown:.2f}")
        if abs(t_gap) > 0.25 or abs(b_gap) > 0.10:
            failures.append(schedule)
        assert measured > 0 and est.step_time > 0 and 0 < bubble < 1 and 0 < est.bubble < 1, rows[-1]
    assert profile.kind == "cpu" and profile.activation_rate > 0 and profile.op_overhead > 0, profile
    assert profile.intra_node_latency > 0 and profile.intra_node_bw > 0 and profile.cores_per_node >= 1, profile
    print("\n" + "\n".join(rows))
    if TIMED:
        assert not failures, "\n".join(rows)


def test_plan_calibrate_writes_a_profile_that_plans(tmp_path):
    """`tandem plan --calibrate OUT.json --nproc 2`, then `tandem plan --gpu OUT.json`."""
    import json
    import subprocess
    import sys

    out = tmp_path / "cpu.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "tandem", "plan", "--calibrate", str(out), "--nproc", "2"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"wrote {out}" in r.stdout, r.stderr[-3000:]
    fields = json.loads(out.read_text())
    assert fields["kind"] == "cpu" and fields["peak_flops"]["fp32"] > 1e8 and fields["activation_rate"] > 0, fields
    assert "calibrated on" in fields["source"], fields
    from tandem.cli import main

    assert main(["plan", "--model", json.dumps(MODEL), "--gpus", "4", "--gpus-per-node", "4", "--gpu", str(out),
                 "--global-batch", "16", "--seq-len", "64", "--precision", "fp32", "--json"]) == 0
