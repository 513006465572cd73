"""tandem.plan's models, checked against the formulas they come from and the published
Megatron-LM runs (Narayanan et al., SC'21, Table 1), and its pieces one by one."""

import json
import time
from fractions import Fraction

import pytest

from tandem.pipeline import Costs, Interleaved1F1B, OneFOneB, ZeroBubbleH1, simulate
from tandem.plan import (MEGATRON_SC21_TABLE1, PRESETS, Layout, ModelSpec, PlanError, estimate, load_model,
                         load_profile)
from tandem.plan.activations import embedding_terms, head_terms, layer_activation_bytes, bytes_per_gpu
from tandem.plan.calibrate import fit_gemm_curve
from tandem.plan.collectives import Link, all_gather_time, all_reduce_time
from tandem.plan.flops import hardware_flops, model_flops, narayanan_flops
from tandem.plan.layout import layout_problems, stage_blocks
from tandem.plan.framework import MEGATRON_SC21, TANDEM
from tandem.plan.memory import peak_activation_bytes
from tandem.plan.search import candidate_layouts, explain, plan
from tandem.plan.step import schedule_of, simulate_step


def _published_layout(row) -> Layout:
    return Layout(tp=row.tp, pp=row.pp, dp=row.dp, microbatch=row.microbatch, recompute="full",
                  schedule="interleaved" if row.virtual_stages > 1 else "1f1b", virtual_stages=row.virtual_stages)


# --- activation memory: Korthikanti et al. 2022, Table 2 and Section 4.3, exactly -----------

def _gpt(h, a, L=1, V=51200):
    return ModelSpec(name="gpt", num_layers=L, hidden_size=h, num_heads=a, vocab_size=V)


@pytest.mark.parametrize("s,b,h,a", [(2048, 1, 12288, 96), (2048, 4, 2304, 24), (1024, 2, 4096, 32), (8, 3, 16, 4)])
@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_megatron_activation_terms_equal_korthikanti(s, b, h, a, t):
    m = _gpt(h, a)
    F = Fraction
    sbh = F(s * b * h)
    core = F(5 * a * s, h * t)

    def ours(**kw):
        return layer_activation_bytes(m, seq_len=s, microbatch=b, tp=t, saved="megatron", dropout=True, **kw)

    if t == 1:
        assert ours() == sbh * (34 + F(5 * a * s, h))  # no parallelism
    assert ours() == sbh * (10 + F(24, t) + core)  # tensor parallelism
    assert ours(sequence_parallel=True) == sbh * (F(34, t) + core)  # TP + SP
    assert ours(recompute="selective") == sbh * (10 + F(24, t))  # TP + selective
    assert ours(sequence_parallel=True, recompute="selective") == sbh * F(34, t)  # TP + SP + selective
    assert ours(recompute="full") == 2 * sbh  # full recomputation keeps the block input
    # the first and last stage (Section 4.3): embedding dropout sbh/t, output 4sbh/t (1 + V/h)
    emb = bytes_per_gpu(embedding_terms(m, seq_len=s, microbatch=b, saved="megatron", dropout=True, tp=t), t, True)
    assert emb - 8 * s * b == sbh / t  # beyond the int64 token ids
    head = bytes_per_gpu(head_terms(m, seq_len=s, microbatch=b, saved="megatron", tp=t), t, True)
    assert head == 4 * sbh / t * (1 + F(m.vocab_size, h))


def test_tandem_terms_differ_from_megatron_as_documented():
    s, b, h, a, t = 512, 2, 1024, 16, 4
    m, sbh = _gpt(h, a), Fraction(s * b * h)
    kw = dict(seq_len=s, microbatch=b, tp=t)
    tandem = layer_activation_bytes(m, saved="tandem", **kw)
    megatron = layer_activation_bytes(m, saved="megatron", dropout=True, **kw)
    # no dropout masks (-2sbh), fused attention: fp32 log-sum-exp 4asb/t for 5as^2b/t, fp32
    # LayerNorm statistics +16sb
    assert tandem - megatron == -2 * sbh + Fraction(4 * a * s * b, t) - Fraction(5 * a * s * s * b, t) + 16 * s * b
    sp_t = layer_activation_bytes(m, saved="tandem", sequence_parallel=True, **kw)
    sp_m = layer_activation_bytes(m, saved="megatron", dropout=True, sequence_parallel=True, **kw)
    # under SP tandem keeps the q/k/v and fc1 inputs all-gathered: 2 x 2sbh (1 - 1/t) more
    assert sp_t - sp_m == (-2 * sbh + Fraction(4 * a * s * b) + 16 * s * b) / t + 4 * sbh * (1 - Fraction(1, t)) \
        - Fraction(5 * a * s * s * b, t)


# --- FLOPs and parameters against the paper -----------------------------------------------

@pytest.mark.parametrize("row", MEGATRON_SC21_TABLE1, ids=lambda r: r.model)
def test_flops_and_parameters_match_the_paper(row):
    m = PRESETS[row.model]
    B, s = row.global_batch, 2048
    paper = narayanan_flops(batch=B, seq_len=s, layers=m.num_layers, hidden=m.hidden_size, vocab=m.vocab_size)
    assert hardware_flops(m, seq_len=s, sequences=B, recompute="full") == pytest.approx(paper, rel=1e-12)
    exact = narayanan_flops(batch=B, seq_len=s, layers=m.num_layers, hidden=m.hidden_size, vocab=m.vocab_size,
                            recompute=False)
    assert model_flops(m, seq_len=s, sequences=B) == pytest.approx(exact, rel=1e-12)
    assert m.num_params() / 1e9 == pytest.approx(row.params_billion, abs=0.051)


# --- the published runs ---------------------------------------------------------------------

def test_megatron_table1_predicted_within_15_percent_fits_and_is_searched(capsys):
    profile = load_profile("A100-80GB")
    lines = [f"{'model':>15} {'published layout':>24} {'TFLOP/s':>7} {'predicted':>9} {'gap':>6} {'GB':>5}   "
             "planner's winner (predicted TFLOP/s, tokens/s vs published layout)"]
    worst = 0.0
    for row in MEGATRON_SC21_TABLE1:
        model, layout = PRESETS[row.model], _published_layout(row)
        kw = dict(global_batch=row.global_batch, seq_len=2048, framework="megatron-sc21")
        est = estimate(model, layout, profile, breakdown=False, **kw)
        gap = est.tflops_per_gpu / row.tflops_per_gpu - 1
        worst = max(worst, abs(gap))
        assert est.fits, f"{row.model}: the published layout needs {est.max_memory / 1e9:.1f} GB"
        assert not layout_problems(layout, model, num_gpus=row.gpus, gpus_per_node=8, global_batch=row.global_batch,
                                   seq_len=2048, framework=MEGATRON_SC21)
        searched = set(candidate_layouts(model, num_gpus=row.gpus, gpus_per_node=8, global_batch=row.global_batch,
                                         seq_len=2048, framework=MEGATRON_SC21))
        assert layout in searched, f"{row.model}: the published layout {layout} is outside the search space"
        best = plan(model, gpus=row.gpus, gpu=profile, top=1, **kw).best
        pub = f"tp={row.tp} pp={row.pp} mb={row.microbatch}" + (f" v={row.virtual_stages}" if row.virtual_stages > 1
                                                               else "")
        lines.append(f"{row.model:>15} {pub:>24} {row.tflops_per_gpu:>7.0f} {est.tflops_per_gpu:>9.1f} {gap:>+6.1%} "
                     f"{est.max_memory / 1e9:>5.1f}   {best.layout} ({best.tflops_per_gpu:.0f}, "
                     f"{est.step_time / best.step_time:.2f}x)")
        assert best.step_time <= est.step_time * 1.001  # the search finds nothing slower than what it was shown
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert worst <= 0.15, "\n".join(lines)


# --- the pipeline part: simulate, extended; in-flight counts ---------------------------------

def _uneven_costs(S, comm):
    costs = {s: Costs(F=1.0, B=2.0, W=0.9, comm=comm) for s in range(S)}
    costs[0] = Costs(F=1.1, B=2.05, W=1.2, comm=comm)
    costs[S - 1] = Costs(F=1.6, B=2.9, W=1.4, comm=comm)
    return costs


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)])
@pytest.mark.parametrize("p,comm", [(2, 0.0), (4, 0.1), (4, 1.5), (8, 0.3)])
def test_extended_simulation_equals_the_full_one(schedule, v, p, comm):
    layout = Layout(pp=p, schedule=schedule, virtual_stages=v)
    costs = _uneven_costs(p * v, comm)
    m = 7 * p
    step = simulate_step(layout, m, costs)
    assert len(step.simulated) == 2 and max(step.simulated) < m
    full = simulate(schedule_of(layout, m), costs)
    assert step.makespan == pytest.approx(full.makespan, rel=1e-9)
    assert step.bubble == pytest.approx(full.bubble_fraction, rel=1e-9)


@pytest.mark.parametrize("make,kind,v", [(lambda p, m: OneFOneB(p, m), "1f1b", 1),
                                         (lambda p, m: ZeroBubbleH1(p, m), "zb-h1", 1),
                                         (lambda p, m: Interleaved1F1B(p, m, virtual_stages=3), "interleaved", 3)])
@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 8), (4, 24), (8, 40)])
def test_in_flight_counts_are_the_simulators(make, kind, v, p, m):
    layout = Layout(pp=p, schedule=kind, virtual_stages=v)
    sim = simulate(make(p, m)).peak_in_flight
    ours = peak_activation_bytes(layout, m, [1.0] * (p * v))
    for r in range(p):
        assert ours[r][1] == max(sim[s] for s in range(r, p * v, p))
    if v == 1:
        assert [peak for peak, _ in ours] == [float(sim[r]) for r in range(p)]


# --- the search -------------------------------------------------------------------------------

def test_plan_answers_a_large_preset_on_each_profile_within_10_s():
    for gpu in ("A100-80GB", "H100-SXM", "H200"):
        start = time.process_time()
        result = plan("gpt3-175b", gpus=1024, global_batch=1536, seq_len=2048, gpu=gpu)
        took = time.process_time() - start
        assert took < 10, f"{gpu}: {took:.1f} s of CPU"
        best = result.best
        assert best.fits and best.layout.gpus == 1024 and best.layout.tp <= 8
        assert result.ranked == tuple(sorted(result.ranked, key=lambda e: e.step_time))
        assert all(len(e.pipeline.simulated) >= 1 for e in result.ranked)  # every row simulated


def test_explain_names_broken_rules_and_memory():
    kw = dict(global_batch=512, seq_len=2048, gpu="A100-80GB")
    why = explain("megatron-18b", "tp=3,pp=1,dp=1,mb=1", gpus=3, **kw)
    assert any("num_heads=48" not in w and "tp=3 does not divide the 8 GPUs" in w for w in why)
    why = explain("megatron-145b", "tp=8,pp=1,dp=1,mb=1,recompute=full", **kw)
    assert len(why) == 1 and "needs" in why[0] and "weights" in why[0]
    assert explain("megatron-1.7b", "tp=1,pp=1,dp=32,mb=16,recompute=full", **kw) == []


def test_estimate_refuses_what_cannot_run():
    with pytest.raises(PlanError, match="microbatches < pp=4"):
        estimate("megatron-76b", "tp=8,pp=4,dp=1,mb=2", "A100-80GB", global_batch=4, seq_len=2048)
    with pytest.raises(PlanError, match="not a multiple of pp"):
        estimate("megatron-76b", "tp=8,pp=4,dp=1,mb=1,schedule=interleaved:v=3", "A100-80GB", global_batch=6,
                 seq_len=2048)
    with pytest.raises(PlanError, match="precision"):
        estimate("megatron-1.7b", "tp=1", "A100-80GB", global_batch=1, seq_len=2048, precision="int8")


# --- pieces -----------------------------------------------------------------------------------

def test_layout_parses_what_it_prints():
    lay = Layout.parse("tp=8,pp=2,dp=32,mb=2,schedule=interleaved:v=5,recompute=full,sp=1,dopt=1")
    assert (lay.tp, lay.pp, lay.dp, lay.microbatch, lay.virtual_stages) == (8, 2, 32, 2, 5)
    assert lay.sequence_parallel and lay.distributed_optimizer and lay.recompute == "full"
    assert Layout.parse(str(lay)) == lay
    for bad, why in [("tp=0", "tp must be an int >= 1"), ("tp=x", "is not an integer"), ("foo=1", "unknown key"),
                     ("schedule=dualpipe", "schedule must be one of"), ("recompute=some", "recompute must be"),
                     ("sp=maybe", "must be 1/0"), ("tp", "is not key=value")]:
        with pytest.raises(ValueError, match=why):
            Layout.parse(bad)


def test_stage_blocks_are_even_and_spare_the_ends():
    assert stage_blocks(126, 16) == [7] + [8] * 14 + [7]
    assert stage_blocks(8, 4) == [2, 2, 2, 2]
    assert sum(stage_blocks(105, 35)) == 105


def test_models_load_from_presets_gpt_configs_and_hugging_face(tmp_path):
    assert load_model("llama3-8b").num_params() / 1e9 == pytest.approx(8.03, abs=0.01)
    assert load_model("llama3-70b").num_params() / 1e9 == pytest.approx(70.55, abs=0.02)
    assert load_model("llama3-405b").num_params() / 1e9 == pytest.approx(405.85, abs=0.05)
    gpt = tmp_path / "gpt.json"
    gpt.write_text(json.dumps({"vocab_size": 256, "max_seq_len": 64, "num_layers": 2, "hidden_size": 64,
                               "num_heads": 4}))
    from tandem.models import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=256, max_seq_len=64, num_layers=2, hidden_size=64, num_heads=4)
    assert load_model(str(gpt)).num_params() == sum(p.numel() for p in GPT(cfg).parameters())
    assert load_model(gpt.read_text()).num_params() == load_model(str(gpt)).num_params()  # inline, as train's --model
    hf = tmp_path / "llama"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False}))
    assert load_model(str(hf)).num_params() == load_model("llama3-8b").num_params()
    for bad, why in [("no-such-model", "not a preset"), ({"layers": 2}, "neither a GPTConfig"),
                     ('{"num_layers": 2,', "not valid JSON")]:
        with pytest.raises(ValueError, match=why):
            load_model(bad)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelSpec(num_layers=1, hidden_size=10, num_heads=3, vocab_size=8)


def test_profiles_round_trip_and_refuse_nonsense(tmp_path):
    path = tmp_path / "h100.json"
    load_profile("H100-SXM").to_json(str(path))
    assert load_profile(str(path)) == load_profile("H100-SXM")
    data = json.loads(path.read_text())
    for change, why in [({"gemm_efficiency": 1.5}, "fraction"), ({"memory_bw": -1}, "memory_bw"),
                        ({"peak_flops": {"int4": 1e15}}, "unknown dtype"), ({"nvlink": 1}, "unknown fields")]:
        with pytest.raises(ValueError, match=why):
            load_profile({**data, **change})


def test_gemm_curve_fit_recovers_its_parameters():
    t0, rate, d0 = 20e-6, 50e9, 32.0
    samples = [(m, n, k, t0 + 2 * m * n * k / rate * (1 + d0 / m + d0 / n + d0 / k))
               for m, n, k in [(64, 64, 64), (512, 64, 512), (512, 512, 512), (32, 512, 512), (1024, 256, 128)]]
    fit = fit_gemm_curve(samples)
    assert fit[0] == pytest.approx(t0, rel=1e-6) and fit[1] == pytest.approx(rate, rel=1e-9) and fit[2] == d0


def test_collectives_use_ring_bus_bandwidth_factors():
    link = Link(bandwidth=100e9, latency=0.0, inter_node=False)
    S = 1e9
    assert all_reduce_time(S, 8, link) == pytest.approx(S * 2 * 7 / 8 / 100e9)
    assert all_gather_time(S, 8, link) == pytest.approx(S * 7 / 8 / 100e9)
    assert all_reduce_time(S, 1, link) == 0.0


def test_frameworks_differ_where_documented():
    assert TANDEM.attention == "flash" and not TANDEM.dropout and TANDEM.sequence_parallel
    assert MEGATRON_SC21.attention == "unfused" and MEGATRON_SC21.dropout
    assert "zb-h1" not in MEGATRON_SC21.schedules


def test_measured_pair_all_reduce_table():
    """A calibrated CPU profile's all-reduce times over 2 ranks: groups of 2 inside a node
    interpolate them (log-log; all-gather and reduce-scatter half), larger groups keep the
    alpha-beta model; the table is checked and survives JSON."""
    import dataclasses
    import math

    from tandem.plan import collectives as coll
    from tandem.plan.profiles import DeviceProfile

    base = load_profile("H100-SXM")
    table = ((4.0, 300e-6), (131072.0, 1.2e-3), (4194304.0, 5e-3))
    prof = dataclasses.replace(base, pair_all_reduce=[list(row) for row in table])  # as JSON gives it
    assert prof.pair_all_reduce == table
    link = coll.group_link(prof, size=2, stride=1, gpus_per_node=8)
    assert coll.all_reduce_time(131072, 2, link) == pytest.approx(1.2e-3)
    assert coll.all_reduce_time(2, 2, link) == pytest.approx(300e-6)  # below the table: its first time
    mid = math.sqrt(4.0 * 131072)  # halfway in log: the geometric mean of the times
    assert coll.all_reduce_time(mid, 2, link) == pytest.approx(math.sqrt(300e-6 * 1.2e-3))
    assert coll.all_reduce_time(8388608, 2, link) == pytest.approx(5e-3 + 4194304 / link.bandwidth)
    assert coll.all_gather_time(131072, 2, link) == pytest.approx(0.6e-3)
    assert coll.reduce_scatter_time(131072, 2, link) == pytest.approx(0.6e-3)
    four = coll.group_link(prof, size=4, stride=1, gpus_per_node=8)
    assert coll.all_reduce_time(131072, 4, four) == coll.all_reduce_time(
        131072, 4, coll.group_link(base, size=4, stride=1, gpus_per_node=8))
    assert load_profile(json.loads(prof.to_json())).pair_all_reduce == table
    for bad in (((4.0, 1e-3), (4.0, 2e-3)), ((0.0, 1e-3),), ((4.0, -1.0),)):
        with pytest.raises(ValueError, match="pair_all_reduce"):
            DeviceProfile(**{**dataclasses.asdict(base), "pair_all_reduce": bad})


def test_ranks_sharing_cores_stretch_each_action_by_its_company():
    """host.Sharing: an action's stretch is 1 + e (c/k - 1) with c the processes computing
    beside it (itself included), so the fill and drain of a pipeline, where ranks run
    alone, keep their time alone and the steady state slows; e = 0 is no sharing at all."""
    from tandem.plan.host import Sharing

    layout = Layout(tp=2, pp=2, microbatch=1, schedule="1f1b")
    costs = {s: Costs(F=1.0, B=2.0, W=0.5) for s in range(2)}
    alone = simulate_step(layout, 4, costs)
    for e in (1.0, 0.5):
        sharing = Sharing(cores=2, ranks=4, per_pipeline_rank=2, efficiency=e)
        assert sharing.stretch(1) == 1.0 and sharing.stretch(2) == pytest.approx(1 + e)
        step = simulate_step(layout, 4, costs, sharing=sharing)
        by_action = {(r.rank, r.kind.name, r.microbatch): r.end_s - r.start_s
                     for r in step.result.timeline if r.kind.is_compute}
        assert by_action[(0, "F", 0)] == pytest.approx(1.0, rel=1e-3)  # the first forward runs alone
        assert by_action[(0, "B", 3)] == pytest.approx(2.5, rel=1e-3)  # the last backward too
        assert 1.0 < by_action[(0, "F", 2)] <= 1.0 + e + 1e-6  # the steady state shares the cores
        assert alone.makespan < step.makespan < (1 + e) * alone.makespan
        assert alone.work < step.work < (1 + e) * alone.work
    none = simulate_step(layout, 4, costs, sharing=Sharing(cores=2, ranks=4, per_pipeline_rank=2, efficiency=0.0))
    assert none.makespan == pytest.approx(alone.makespan) and none.bubble == pytest.approx(alone.bubble)


def test_jitter_lengthens_the_step_and_is_deterministic():
    """With spread in every action's time the pipeline waits for the later producer: the
    median makespan and bubble grow with the spread; jitter 0 is the exact simulation, and
    the same inputs give the same estimate."""
    layout = Layout(pp=4, microbatch=1, schedule="1f1b")
    costs = {s: Costs(F=1.0, B=2.0, W=1.0) for s in range(4)}
    exact = simulate_step(layout, 8, costs)
    assert simulate_step(layout, 8, costs, jitter=0.0) == exact
    small, large = (simulate_step(layout, 8, costs, jitter=j) for j in (0.1, 0.3))
    assert exact.makespan < small.makespan < large.makespan
    assert exact.bubble < small.bubble < large.bubble
    assert simulate_step(layout, 8, costs, jitter=0.3) == large


def test_calibrated_sharing_jitter_and_block_scale():
    """calibrate's fits on known passes: all pairs at once r x as long as alone gives
    e = (r - 1) / (nproc/k - 1); the jitter is the spread of log times; the compute scale
    is the block alone over the component model's, and every F, B and W carries it."""
    import dataclasses
    import math

    from tandem.plan.calibrate import SHARING_BATCH, SHARING_BLOCK, _compute_scale, _sharing_fit
    from tandem.plan.timing import stage_costs

    flat = {"cores": 2, "sharing": [([0.01] * 5, [0.015] * 5)] * 4}
    e, jitter = _sharing_fit([flat] * 4, nproc=4)
    assert e == pytest.approx(0.5) and jitter == 0.0
    assert _sharing_fit([flat] * 4, nproc=2) == (1.0, 0.0)  # a core each: nothing to measure
    spread = {"cores": 2, "sharing": [([0.01 * math.exp(d) for d in (-0.2, -0.1, 0, 0.1, 0.2)], [])]}
    assert _sharing_fit([spread], nproc=2)[1] == pytest.approx(1.4826 * 0.1)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="jitter"):
            dataclasses.replace(load_profile("H100-SXM"), jitter=bad)
    with pytest.raises(ValueError, match="compute_scale"):
        dataclasses.replace(load_profile("H100-SXM"), compute_scale=0.0)
    prof = dataclasses.replace(load_profile("H100-SXM"), kind="cpu", peak_flops={"fp32": 1e11}, fused_gelu=False)
    one = _compute_scale([{"sharing": [([1.0], [])]}], prof)
    assert _compute_scale([{"sharing": [([2.0], [])]}], prof) == pytest.approx(2 * one)
    assert _compute_scale([{}], prof) == 1.0
    model = load_model(dict(vocab_size=128, max_seq_len=64, num_layers=4, hidden_size=128, num_heads=4,
                            ffn_hidden_size=512))
    layout = Layout(tp=2, pp=2, microbatch=2)
    kw = dict(seq_len=64, precision="fp32", blocks=[2, 2], gpus_per_node=4)
    plain = stage_costs(model, layout, prof, TANDEM, **kw)
    scaled = stage_costs(model, layout, dataclasses.replace(prof, compute_scale=1.5), TANDEM, **kw)
    for a, b in zip(plain, scaled):
        for kind in ("F", "B", "W"):
            assert getattr(b, kind).total == pytest.approx(1.5 * getattr(a, kind).total)
    assert SHARING_BATCH >= 1 and SHARING_BLOCK["hidden_size"] % SHARING_BLOCK["num_heads"] == 0
