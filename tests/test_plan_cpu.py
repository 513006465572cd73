"""tandem plan against tandem's own runs on CPU: a profile calibrated on this machine
predicts the step time of `tandem train` at tp=2 x pp=2 (1F1B and ZB-H1) within 25% and its
bubble within 10% (relative), both measured as the median over the steps after warm-up."""

import os
import statistics

import pytest

from distributed import run_ranks
from plan_cpu_run import BATCH, MICROBATCHES, MODEL, train_and_time

STEPS, WARMUP = 10, 2


@pytest.mark.skipif(os.environ.get("TANDEM_TIMED_TESTS") != "1",
                    reason="a timing check (wall-clock step times on this machine): run it on an idle machine "
                    "with TANDEM_TIMED_TESTS=1; its results are recorded in benchmarks/RESULTS.md")
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
    print("\n" + "\n".join(rows))
    assert not failures, "\n".join(rows)
