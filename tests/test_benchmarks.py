"""The benchmark harness: helpers in benchmarks/common.py and `bench_linear_gelu.py --quick`
run on CPU as a user runs it (a subprocess), its table and JSON checked for form."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)

import bench_linear_gelu  # noqa: E402
import common  # noqa: E402

QUICK_SHAPES = 16
TABLE_FIELDS = 12  # M K N tp variant fwd TFLOP/s bwd TFLOP/s f+b TFLOP/s #wrong
RATIO_FIELDS = 9  # M K N tp fwd/unfused fwd/addmm fwd/gemm bwd/unfused f+b/unfused


# ---------------------------------------------------------------------------------------
# common.py


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_busbw_factors_match_nccl_tests(n):
    assert common.busbw_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    assert common.busbw_factor("all_gather", n) == pytest.approx((n - 1) / n)
    assert common.busbw_factor("reduce_scatter", n) == pytest.approx((n - 1) / n)
    assert common.busbw_factor("send_recv", n) == 1.0
    # 1 GB in 10 ms is 100 GB/s algorithm bandwidth
    assert common.busbw_gbps("all_reduce", 10**9, 10.0, n) == pytest.approx(100 * 2 * (n - 1) / n)


def test_busbw_rejects_unknown_collective_and_world_size():
    with pytest.raises(ValueError, match="allreduce"):
        common.busbw_factor("allreduce", 2)
    with pytest.raises(ValueError, match="world_size"):
        common.busbw_factor("all_reduce", 0)


def test_table_rows_line_up_with_header():
    table = common.Table([common.Column("size", "(B)", 10, "d"), common.Column("time", "(us)", 8, ".2f"),
                          common.Column("#wrong", "", 6, "d")])
    names, units = table.header().splitlines()
    row = table.row([1024, 3.14159, 0])
    missing = table.row([8, float("nan"), None])
    assert names.startswith("#") and units.startswith("#") and row.startswith(" ")
    assert len(names) == len(row) == len(missing)
    assert row.split() == ["1024", "3.14", "0"]
    assert missing.split() == ["8", "n/a", "n/a"]
    with pytest.raises(ValueError, match="2 values for 3 columns"):
        table.row([1, 2])


def test_benchmark_returns_one_time_per_iteration():
    calls = []
    timing = common.benchmark(lambda: calls.append(1), device=torch.device("cpu"), warmup=3, iters=5)
    assert len(calls) == 8 and len(timing.times_ms) == 5
    assert timing.min_ms <= timing.median_ms <= timing.max_ms


def test_count_wrong_accepts_rounding_and_catches_faults():
    g = torch.Generator().manual_seed(0)
    x = common.random_tensor((64, 96), dtype=torch.bfloat16, device=torch.device("cpu"), generator=g)
    w = common.random_tensor((48, 96), dtype=torch.bfloat16, device=torch.device("cpu"), generator=g)
    ref = x.double() @ w.double().t()
    assert common.count_wrong(x @ w.t(), ref, dtype=torch.bfloat16, reduction=96) == 0
    shifted = x[:, 1:] @ w[:, :-1].t()  # an off-by-one operand: wrong almost everywhere
    assert common.count_wrong(shifted, ref, dtype=torch.bfloat16, reduction=96) > 0.9 * ref.numel()
    broken = (x @ w.t()).clone()
    broken[3, 5] = float("nan")
    assert common.count_wrong(broken, ref, dtype=torch.bfloat16, reduction=96) == 1


def test_bench_check_flags_a_wrong_variant():
    """The #wrong column is live: a forward that drops the bias is counted wrong."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(s, generator=g)
    x, w, b, grad_out = rand(32, 64), rand(48, 64) / 8, rand(48), rand(32, 48)
    ref = bench_linear_gelu.reference("tanh", x, w, b, grad_out)
    good = bench_linear_gelu.forward_fn("unfused", "tanh")
    no_bias = lambda x, w, b: F.gelu(F.linear(x, w), approximate="tanh")
    assert bench_linear_gelu.wrong_of("unfused", good, x, w, b, grad_out, ref) == 0
    assert bench_linear_gelu.wrong_of("unfused", no_bias, x, w, b, grad_out, ref) > 0


def test_full_shape_grid_is_the_issue_list():
    grid = bench_linear_gelu.shapes(quick=False)
    assert len(grid) == QUICK_SHAPES
    assert {(s.m, s.k, s.n * s.tp) for s in grid} == {(m, k, n) for m in (4096, 16384)
                                                       for k, n in ((4096, 14336), (8192, 28672))}
    assert {s.tp for s in grid} == {1, 2, 4, 8}


# ---------------------------------------------------------------------------------------
# bench_linear_gelu.py --quick, end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "linear_gelu.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH_DIR, "bench_linear_gelu.py"), "--quick", "--device", "cpu",
         "--warmup", "1", "--iters", "2", "--json", str(path)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(path) as f:
        record = json.load(f, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    return proc.stdout, record


def test_quick_table_is_well_formed(quick_run):
    out, _ = quick_run
    lines = out.splitlines()
    header = {line.split(":", 1)[0].strip("# ").strip() for line in lines if line.startswith("# ") and ":" in line}
    assert {"torch", "cuda", "nccl", "tandem", "device", "world_size", "dtype", "warmup", "iters"} <= header
    rows = [line.split() for line in lines if line and not line.startswith("#")]
    times = [r for r in rows if len(r) == TABLE_FIELDS]
    ratios = [r for r in rows if len(r) == RATIO_FIELDS]
    assert len(times) + len(ratios) == len(rows)
    assert len(times) == 4 * QUICK_SHAPES and len(ratios) == QUICK_SHAPES
    assert {r[4] for r in times} == set(bench_linear_gelu.VARIANTS)
    for r in times:
        assert all(v.isdigit() for v in r[:4]) and r[-1] == "0", r
        fwd_ms = float(r[5])
        assert fwd_ms > 0 and math.isfinite(fwd_ms), r
        assert (r[7] == "n/a") == (r[4] == "addmm_act"), r  # addmm_activation has no backward
    verdicts = [line for line in lines if line.startswith(("# PASS", "# MISS"))]
    assert len(verdicts) == len(bench_linear_gelu.TARGETS)
    assert lines[-1] == "# wrong values: 0 OK"


def test_quick_json_is_well_formed(quick_run):
    _, record = quick_run
    assert record["benchmark"] == "bench_linear_gelu"
    assert record["env"]["dtype"] == "float32" and record["env"]["iters"] == 2
    assert record["wrong"] == 0 and record["skipped_shapes"] == []
    assert len(record["results"]) == 4 * QUICK_SHAPES and len(record["speedups"]) == QUICK_SHAPES
    for row in record["results"]:
        assert row["wrong"] == 0
        assert row["fwd_ms"] > 0 and row["fwd_tflops"] > 0
        if row["variant"] == "addmm_act":
            assert row["bwd_ms"] is None and row["fwdbwd_ms"] is None
        else:
            assert row["bwd_ms"] > 0 and row["fwdbwd_ms"] > 0
    keys = {t["key"] for t in record["targets"]}
    assert keys == {key for key, *_ in bench_linear_gelu.TARGETS}
    for t in record["targets"]:
        assert t["value"] > 0 and isinstance(t["pass"], bool) and t["pass"] == (t["value"] >= t["target"])


# ---------------------------------------------------------------------------------------
# bench_pipeline.py: the costs it gives the simulator and the in-step message time


def _timeline(rows):
    from tandem.pipeline.ir import ActionKind, TimelineRecord

    return [TimelineRecord(rank, stage, ActionKind(kind), mb, start, end)
            for rank, stage, kind, mb, start, end in rows]


def test_pipeline_costs_and_latency_from_a_timeline():
    import bench_pipeline

    from tandem.pipeline import OneFOneB

    layout = OneFOneB(2, 2).layout
    tl = _timeline([
        (0, 0, "F", 0, 0.0, 1.0), (0, 0, "SEND_F", 0, 1.0, 1.1), (0, 0, "F", 1, 1.1, 2.1),
        (0, 0, "SEND_F", 1, 2.1, 2.3), (0, 0, "RECV_B", 0, 2.3, 2.4), (0, 0, "B", 0, 4.0, 6.0),
        (1, 1, "RECV_F", 0, 0.0, 0.05), (1, 1, "RECV_F", 1, 0.05, 0.15),
        (1, 1, "F", 0, 1.5, 2.5),   # idle since before 0SEND_F0 started: 0.5 after it
        (1, 1, "B", 0, 2.5, 3.5), (1, 1, "SEND_B", 0, 3.5, 3.6),
        (1, 1, "F", 1, 3.9, 4.9),   # started late, but its rank was busy when 0SEND_F1 started
    ])
    costs = bench_pipeline._costs(tl, split_backward=False, comm_s=0.25)
    assert costs[0].F == pytest.approx(1.0) and costs[0].B == costs[0].W == pytest.approx(1.0)
    assert costs[0].post_send == pytest.approx(0.15) and costs[0].post_recv == pytest.approx(0.1)
    assert costs[1].post_send == pytest.approx(0.1) and costs[1].post_recv == pytest.approx(0.075)
    assert costs[1].comm == 0.25
    # 1F0 0.5 s after its send, 0B0 too (1SEND_B0 at 3.5, 0B0 at 4.0); 1F1 is no sample:
    # rank 1 was busy until 3.6, after 0SEND_F1 started (2.1), so 1.8 s is not a latency
    assert bench_pipeline._latency_s(tl, layout) == pytest.approx(0.5)
    assert bench_pipeline._latency_s(tl[:4], layout) is None
    assert bench_pipeline._latency_s([rec for rec in tl if rec.action.kind.value != "B"], layout) \
        == pytest.approx(0.5)  # 1F0 alone: 1F1 is still no sample
