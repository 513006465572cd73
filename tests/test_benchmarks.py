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


# ---------------------------------------------------------------------------------------
# bench_generate.py: layouts, per-request times, the comparisons; worlds.py; the quick run


def test_generate_layouts_parse_and_refuse_bad_items():
    import bench_generate as bg

    got = bg.parse_layouts("tp1,tp2, pp2,tp2xpp2")
    assert [(lay.tp, lay.pp, lay.world, lay.name) for lay in got] == [
        (1, 1, 1, "tp1"), (2, 1, 2, "tp2"), (1, 2, 2, "pp2"), (2, 2, 4, "tp2xpp2")]
    for bad, says in (("tp2x", "'tp2x' is not"), ("dp2", "'dp2' is not"), ("tp1,,pp2", "'' is not"),
                      ("tp0", "'tp0': tp and pp must be >= 1"), ("pp2,tp1xpp2", "pp2 is given twice")):
        with pytest.raises(ValueError, match=says):
            bg.parse_layouts(bad)
    assert bg.cases(bg.Layout(2, 2), 8) == [bg.Case(1, 1), bg.Case(8, 1), bg.Case(8, 2)]
    assert bg.cases(bg.Layout(2, 1), 8) == [bg.Case(1, 1), bg.Case(8, 1)]


def test_generate_request_times():
    import bench_generate as bg

    # request 0: tokens at 10, 12, 14 ms after t0; request 1: at 20, 23, 26 ms
    t0 = 100.0
    stamps = {0: [t0 + 0.010, t0 + 0.012, t0 + 0.014], 1: [t0 + 0.020, t0 + 0.023, t0 + 0.026]}
    got = bg.request_times(stamps, t0, 3, 2)
    assert got["ttft_ms"] == pytest.approx(15.0) and got["tpot_ms"] == pytest.approx(2.5)
    assert got["last_ms"] == pytest.approx(20.0)
    with pytest.raises(ValueError, match=r"requests \[1\] do not have 3 token times"):
        bg.request_times({0: stamps[0], 1: stamps[1][:2]}, t0, 3, 2)
    with pytest.raises(ValueError, match="needs >= 2 new tokens"):
        bg.request_times({0: [t0]}, t0, 1, 1)


def _row(layout, tp, pp, requests, groups, ttft, tpot, tokens_per_s):
    return {"layout": layout, "tp": tp, "pp": pp, "requests": requests, "groups": groups, "ttft_ms": ttft,
            "tpot_ms": tpot, "tokens_per_s": tokens_per_s}


def test_generate_comparisons_are_ratios_of_the_rows():
    import bench_generate as bg

    rows = [_row("tp1", 1, 1, 1, 1, 10.0, 2.0, 50.0), _row("tp1", 1, 1, 8, 1, 40.0, 4.0, 200.0),
            _row("pp2", 1, 2, 1, 1, 12.0, 3.0, 40.0), _row("pp2", 1, 2, 8, 1, 44.0, 5.0, 160.0),
            _row("pp2", 1, 2, 8, 2, 30.0, 3.0, 300.0),
            _row("tp2xpp2", 2, 2, 1, 1, 5.0, 1.0, 90.0)]  # no tp2 row: not compared
    (c,) = bg.compare(rows)
    assert (c["layout"], c["base"], c["requests"], c["groups"]) == ("pp2", "tp1", 8, 2)
    assert c["ttft_ratio"] == pytest.approx(1.2) and c["tpot_ratio"] == pytest.approx(1.5)
    assert c["throughput_ratio"] == pytest.approx(1.5) and c["groups_vs_batch"] == pytest.approx(300 / 160)
    latency, throughput = bg.shows([c])
    assert latency["verdict"] == "yes" and throughput["verdict"] == "yes"
    assert "8 requests in flight" in throughput["claim"]
    slower = [dict(r, tokens_per_s=100.0) if r["groups"] == 2 else r for r in rows]
    assert bg.shows(bg.compare(slower))[1]["verdict"] == "no"
    mixed = [dict(r, ttft_ms=9.0) if r["layout"] == "pp2" and r["requests"] == 1 else r for r in rows]
    assert bg.shows(bg.compare(mixed))[0]["verdict"] == "mixed"
    assert [v["verdict"] for v in bg.shows([])] == ["not measured", "not measured"]


class _Echo:
    """A world's state for the Worlds tests: rank 1 of world "bad" fails in ``run``."""

    def __init__(self, spec, rank):
        self.spec, self.rank = spec, rank
        self.info = {"rank": rank, "spec": spec}

    def run(self, command):
        import torch.distributed as dist

        if command == "fail" and self.rank == 1:
            raise ValueError("rank 1 refuses")
        t = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(t)  # collective within this world only
        return (self.spec, command, float(t))


def test_worlds_take_turns_and_report_a_failing_rank():
    import worlds

    w = worlds.Worlds({"one": (1, "a"), "two": (2, "b")}, _Echo, timeout=60)
    with w:
        assert w.info == {"one": {"rank": 0, "spec": "a"}, "two": {"rank": 0, "spec": "b"}}
        assert w.run("two", 7) == ("b", 7, 3.0) and w.run("one", 8) == ("a", 8, 1.0)
        with pytest.raises(ValueError, match="no world 'three'"):
            w.run("three", 1)
        with pytest.raises(worlds.WorldError, match="(?s)world two rank 1 failed.*rank 1 refuses"):
            w.run("two", "fail")
    assert all(not p.is_alive() for p, _ in sum(w._procs.values(), [])) and w._procs == {}
    with pytest.raises(ValueError, match="world 'x' needs a size >= 1"):
        worlds.Worlds({"x": (0, None)}, _Echo)


def test_bench_generate_quick(tmp_path):
    """`tandem bench generate --quick`: a row per layout and case, numbers that agree with
    each other, the comparison lines computed from the rows, the JSON record and the plot."""
    import bench_generate as bg

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tandem", "bench", "generate", "--quick", "--json",
                           str(tmp_path / "json"), "--plot", str(tmp_path / "png")],
                          cwd=os.path.dirname(BENCH_DIR), capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    table = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    want = [(lay.name, c.requests, c.groups) for lay in bg.parse_layouts("tp1,tp2,pp2,tp2xpp2")
            for c in bg.cases(lay, bg.QUICK["requests"])]
    assert [(r[0], int(r[4]), int(r[5])) for r in table] == want
    with open(tmp_path / "json" / "generate.json") as f:
        record = json.load(f)
    assert record["benchmark"] == "bench_generate" and record["wrong"] == 0
    assert record["env"]["iters"] == bg.QUICK["iters"] and record["env"]["loadavg"]
    new = bg.QUICK["new_tokens"]
    for row in record["results"]:
        assert row["wrong"] == 0 and row["rounds"] == bg.QUICK["iters"], row
        assert 0 < row["ttft_ms"] <= row["last_ms"] <= row["e2e_ms"], row
        assert row["tpot_ms"] > 0 and 0 < row["cores"] <= row["ranks"] + 1, row  # + their threads
        assert row["tokens_per_s"] == pytest.approx(row["requests"] * new / (row["e2e_ms"] * 1e-3)), row
    want = bg.compare(record["results"])
    assert len(record["comparisons"]) == len(want)
    for got, ratios in zip(record["comparisons"], want):
        assert got.keys() == ratios.keys()
        assert all(got[k] == pytest.approx(v) if isinstance(v, float) else got[k] == v for k, v in ratios.items())
    assert [c["layout"] for c in record["comparisons"]] == ["pp2", "tp2xpp2"]
    assert record["shows"] == bg.shows(record["comparisons"])
    shown = [line for line in lines if line.startswith("# shows")]
    assert len(shown) == 2 and all(v["verdict"] in line for v, line in zip(record["shows"], shown))
    assert sum(line.startswith("# compare") for line in lines) == 4
    with open(tmp_path / "png" / "generate.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
