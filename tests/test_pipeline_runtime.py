"""PipelineRunner against a single-process reference (gloo, pp = 2 and 4).

For every schedule: the loss and every gradient of every stage equal those of the whole
model run in one process on the same batch with the same weights. One spawned world per
pipeline size runs all of its cases.
"""

import json
import os

import pytest
import torch
from torch import nn

from distributed import outcome, run_ranks

H = 8


class _WLinear(nn.Linear):
    """nn.Linear whose parameter gradients a split backward defers to W (tandem.nn.wgrad),
    so that ZB-H1's W does real work here."""

    def forward(self, x):
        from tandem.nn import wgrad

        return wgrad.linear(x, self.weight, self.bias)


def _layers(n):
    torch.manual_seed(0)
    return [nn.Sequential(_WLinear(H, H), nn.Tanh()) for _ in range(n)]


class _Sleepy(nn.Module):
    """Sleeps in its second forward (microbatch 1)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, x):
        import time

        self.calls += 1
        if self.calls == 2:
            time.sleep(self.seconds)
        return x


class _CutInput(nn.Module):
    """A layer that detaches its input: the stage's input gets no gradient."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(H, H)

    def forward(self, x):
        return self.inner(x.detach())


def _refusals(mesh, world):
    """A rank that refuses to build its runner (it was given the wrong stage), then a stage
    whose input gets no gradient: every rank fails with that rank's message, at once."""
    from tandem.pipeline import OneFOneB, PipelineRunner, split

    bad = world - 1
    stage = split(_layers(world), world, balance="uniform", stage=0 if mesh.pp_rank == bad else None)
    kw = dict(mesh=mesh, schedule=OneFOneB(world, world), loss_fn=nn.functional.mse_loss,
              num_microbatches=world, timeout=60)
    refused = outcome(lambda: PipelineRunner(stage, **kw))
    # hand-written lists of the same name and sizes that differ: every rank refuses
    from tandem.pipeline import CustomSchedule, GPipe, lower

    mine = CustomSchedule(lower(GPipe(world, world) if mesh.pp_rank == 0 else OneFOneB(world, world)))
    kw_custom = dict(kw, schedule=mine)
    differ = outcome(lambda: PipelineRunner(split(_layers(world), world, balance="uniform"), **kw_custom))
    layers = _layers(world)
    layers[1] = _CutInput()
    runner = PipelineRunner(split(layers, world, balance="uniform"), **kw)
    x, y = _batch(2 * world)
    cut = outcome(lambda: runner.step(x if mesh.pp_rank == 0 else None, y if mesh.pp_rank == bad else None))
    again = outcome(lambda: runner.step(x if mesh.pp_rank == 0 else None, y if mesh.pp_rank == bad else None))
    return refused, cut, again, differ


def _aborted_elsewhere(mesh, world):
    """The last rank aborts the mesh (a failure of its own that the others finished before
    seeing) a second after the others started building a runner on it: their agreement,
    waiting for that rank, stops at once with its reason instead of at the timeout."""
    import time

    from tandem.pipeline import OneFOneB, PipelineRunner, split

    if mesh.pp_rank == world - 1:
        time.sleep(1.0)
        mesh.abort(f"pipeline rank {world - 1}: a failure the others missed")
    return outcome(lambda: PipelineRunner(split(_layers(world), world, balance="uniform"), mesh=mesh,
                                          schedule=OneFOneB(world, world), loss_fn=nn.functional.mse_loss,
                                          num_microbatches=world, timeout=60))


def _tp_peer_failure():
    """tp=2 inside one stage: a layer raises on tp rank 0 in microbatch 1, before that
    microbatch's TP all-reduce; tp rank 1, waiting in it, stops with that message at once
    (not at the runner's timeout, nor the communicator's)."""
    import tandem
    from tandem.nn import ParallelMLP
    from tandem.pipeline import GPipe, PipelineRunner, split

    def run(first_layer, timeout):
        mesh = tandem.init_mesh(tp=2)
        torch.manual_seed(0)
        layers = [first_layer if mesh.tp_rank == 0 else nn.Identity(), ParallelMLP(H, 2 * H, mesh=mesh)]
        runner = PipelineRunner(split(layers, 1, stage=0), mesh=mesh, schedule=GPipe(1, 2),
                                loss_fn=nn.functional.mse_loss, num_microbatches=2, timeout=timeout)
        x, y = _batch(4)
        failed = outcome(lambda: runner.step(x, y))
        later = outcome(lambda: PipelineRunner(split(layers, 1, stage=0), mesh=mesh, schedule=GPipe(1, 2),
                                               loss_fn=nn.functional.mse_loss, num_microbatches=2))
        return failed, later

    # then a peer that is only late: the waiting rank gives up at the runner's timeout (2 s)
    return run(_Boom(), 60), run(_Sleepy(4.0), 2)


def _tied_accumulation(mesh, world):
    """A GPT with tied embeddings, two steps without zeroing: this rank's tied gradients
    after each step."""
    from tandem.models import GPT, GPTConfig
    from tandem.nn import vocab_parallel_cross_entropy
    from tandem.pipeline import OneFOneB, PipelineRunner, split

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, max_seq_len=8, num_layers=max(1, world - 2), hidden_size=16,
                          num_heads=2, tie_embeddings=True), mesh=mesh)
    stage = split(model.layers(), world, balance="uniform")
    runner = PipelineRunner(stage, mesh=mesh, schedule=OneFOneB(world, world), num_microbatches=world,
                            loss_fn=lambda y, t: vocab_parallel_cross_entropy(y, t, mesh=mesh), timeout=60)
    g = torch.Generator().manual_seed(5)
    ids, targets = torch.randint(0, 32, (2 * world, 8), generator=g), torch.randint(0, 32, (2 * world, 8), generator=g)
    grads = []
    for _ in range(2):
        runner.step(ids if mesh.pp_rank == 0 else None, targets if mesh.pp_rank == world - 1 else None)
        grads.append([p.grad.tolist() for p, _ in stage.tied.values()])  # exact: float32 -> float
    runner.close()
    return grads


def _batch(b):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, H, generator=g), torch.randn(b, H, generator=g)


class _Boom(nn.Module):
    """Raises in its second forward (microbatch 1)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom in a layer")
        return x


def _failing_stage(mesh, world):
    """A stage that raises: every rank stops with its error, long before the timeout."""
    import time

    from tandem.pipeline import OneFOneB, PipelineError, PipelineRunner, split

    bad = world - 2
    layers = _layers(world)
    stage = split(layers, world, balance="uniform")
    if mesh.pp_rank == bad:
        stage.layers.add_module("boom", _Boom())
    runner = PipelineRunner(stage, mesh=mesh, schedule=OneFOneB(world, world),
                            loss_fn=nn.functional.mse_loss, num_microbatches=world, timeout=60)
    x, y = _batch(4 * world)
    t0 = time.monotonic()
    try:
        runner.step(x if mesh.pp_rank == 0 else None, y if mesh.pp_rank == world - 1 else None)
    except PipelineError as e:
        return str(e), time.monotonic() - t0
    return "no error", time.monotonic() - t0


def _reference(num_layers, b, used):
    """Loss and gradients of the whole model on the first ``used`` rows of the batch."""
    layers = _layers(num_layers)
    model = nn.Sequential(*layers)
    x, y = _batch(b)
    loss = nn.functional.mse_loss(model(x[:used]), y[:used])
    loss.backward()
    grads = {f"layers.{i}.{n}": p.grad.clone() for i, layer in enumerate(layers)
             for n, p in layer.named_parameters()}
    return loss.detach(), grads


def _schedules(p):
    from tandem.pipeline import GPipe, Interleaved1F1B, OneFOneB, ZeroBubbleH1

    return [(GPipe(p, p + 1), 1), (OneFOneB(p, 2 * p), 1), (OneFOneB(p, p + 1), 1),
            (Interleaved1F1B(p, 2 * p, virtual_stages=2), 2), (ZeroBubbleH1(p, 2 * p), 1),
            (ZeroBubbleH1(p, p + 1), 1)]


def _check_schedules(rank, world, tmp):
    import tandem
    from tandem.pipeline import PipelineRunner, split

    mesh = tandem.init_mesh(pp=world)
    num_layers, b = 2 * world, 4 * world * 3
    x, y = _batch(b)
    report = []
    for sched, v in _schedules(world):
        layers = _layers(num_layers)
        stages = [split(layers, world * v, balance="uniform", stage=s)
                  for s in sched.layout.stages_of(mesh.pp_rank)]
        runner = PipelineRunner(stages if v > 1 else stages[0], mesh=mesh, schedule=sched,
                                loss_fn=nn.functional.mse_loss,
                                num_microbatches=sched.num_microbatches, timeout=60)
        m = sched.num_microbatches
        bb = (b // m) * m
        ref_loss_m, ref_grads_m = _reference(num_layers, b, bb)  # the rows that split evenly
        loss = runner.step(x[:bb] if mesh.pp_rank == 0 else None,
                           y[:bb] if mesh.pp_rank == world - 1 else None)
        torch.testing.assert_close(loss, ref_loss_m, msg=f"{sched}: loss")
        for st in stages:
            for name, p in st.named_parameters():
                torch.testing.assert_close(p.grad, ref_grads_m[name], msg=f"{sched}: {name}")
        kinds = {rec.kind.value for rec in runner.timeline}
        report.append((repr(sched), sorted(kinds)))
        # a second step with the learned static shapes accumulates the same gradients again
        loss2 = runner.step(x[:bb] if mesh.pp_rank == 0 else None,
                            y[:bb] if mesh.pp_rank == world - 1 else None)
        torch.testing.assert_close(loss2, ref_loss_m)
        for st in stages:
            for name, p in st.named_parameters():
                torch.testing.assert_close(p.grad, 2 * ref_grads_m[name], msg=f"{sched} step 2: {name}")
        if isinstance(sched, type(_schedules(world)[-1][0])):
            runner.save_chrome_trace(os.path.join(tmp, f"trace{rank}.json"))
    # inference: forward() equals the model's output on the last stage, None elsewhere
    layers = _layers(num_layers)
    sched = _schedules(world)[1][0]
    runner = PipelineRunner(split(layers, world, balance="uniform"), mesh=mesh, schedule=sched,
                            loss_fn=nn.functional.mse_loss, num_microbatches=sched.num_microbatches)
    out = runner.forward(x if mesh.pp_rank == 0 else None)
    if mesh.pp_rank == world - 1:
        torch.testing.assert_close(out, nn.Sequential(*_layers(num_layers))(x))
    else:
        assert out is None
    _dynamic_shapes(mesh, world)

    def fresh():  # a failed call aborts its mesh's communicators: each failure case gets its own
        return tandem.init_mesh(pp=world)

    return (report, _failing_stage(fresh(), world), _shape_change(fresh(), world), _refusals(fresh(), world),
            _tied_accumulation(fresh(), world), _tp_peer_failure() if world == 2 else None,
            _aborted_elsewhere(fresh(), world))


def _dynamic_shapes(mesh, world):
    """shapes="dynamic": steps whose microbatches change shape give the reference's loss and
    gradients (headers travel with every message; receives posted before they land)."""
    from tandem.pipeline import Interleaved1F1B, PipelineRunner, split

    sched = Interleaved1F1B(world, 2 * world, virtual_stages=2)
    for rows in (4 * world, 6 * world):
        layers = _layers(2 * world)
        stages = [split(layers, 2 * world, balance="uniform", stage=s)
                  for s in sched.layout.stages_of(mesh.pp_rank)]
        if rows == 4 * world:
            runner = PipelineRunner(stages, mesh=mesh, schedule=sched, loss_fn=nn.functional.mse_loss,
                                    num_microbatches=2 * world, shapes="dynamic", timeout=60)
        else:  # the same runner, new weights of the same values, another batch size
            for ex, st in zip(runner.stages.values(), stages):
                ex.module.load_state_dict(st.state_dict())
                ex.module.zero_grad(set_to_none=True)
        x, y = _batch(rows)
        loss = runner.step(x if mesh.pp_rank == 0 else None, y if mesh.pp_rank == world - 1 else None)
        ref_loss, ref_grads = _reference(2 * world, rows, rows)
        torch.testing.assert_close(loss, ref_loss, msg=f"dynamic shapes, {rows} rows: loss")
        for st in runner.stage_modules:
            for name, p in st.named_parameters():
                torch.testing.assert_close(p.grad, ref_grads[name], msg=f"dynamic, {rows} rows: {name}")


def _shape_change(mesh, world):
    """shapes="static": a later step whose activations have another shape fails on every
    rank with the sender's message, long before the timeout."""
    import time

    from tandem.pipeline import OneFOneB, PipelineError, PipelineRunner, split

    runner = PipelineRunner(split(_layers(world), world, balance="uniform"), mesh=mesh,
                            schedule=OneFOneB(world, world), loss_fn=nn.functional.mse_loss,
                            num_microbatches=world, timeout=60)
    x, y = _batch(2 * world)
    first, last = mesh.pp_rank == 0, mesh.pp_rank == world - 1
    runner.step(x if first else None, y if last else None)
    x, y = _batch(4 * world)  # twice the rows per microbatch
    t0 = time.monotonic()
    try:
        runner.step(x if first else None, y if last else None)
    except PipelineError as e:
        return str(e), time.monotonic() - t0
    return "no error", time.monotonic() - t0


@pytest.mark.parametrize("world", [2, 4])
def test_every_schedule_matches_single_process(world, tmp_path):
    results = run_ranks(world, _check_schedules, str(tmp_path), timeout=240)
    reports = [r[0] for r in results]
    for kinds in (k for _, k in reports[0]):
        assert {"F", "B"} <= set(kinds)
    assert any("W" in k for _, k in reports[0])  # ZB-H1 ran split backwards
    for rank, (_, (message, seconds), *_) in enumerate(results):
        assert f"stage {world - 2} " in message and "boom in a layer" in message, (rank, message)
        assert f"in {world - 2}F1" in message and seconds < 30, (rank, message, seconds)
    for rank, (_, _, (message, seconds), *_) in enumerate(results):
        assert "does not match the static shape agreed on first use, float32[2, 8]" in message, (rank, message)
        assert "float32[4, 8]" in message and seconds < 30, (rank, message, seconds)
    bad = world - 1
    for rank, (refused, cut, again, differ) in enumerate(r[3] for r in results):
        assert differ[0] == "PipelineError" and "called PipelineRunner with different schedule" in differ[1], \
            (rank, differ)
        kind, message, seconds = refused
        assert kind == ("ValueError" if rank == bad else "PipelineError"), (rank, refused)
        assert f"pipeline rank {bad} runs stage {bad} of {world}, but was given stage 0" in message, (rank, refused)
        assert seconds < 30, (rank, refused)
        kind, message, seconds = cut
        assert kind == "PipelineError" and seconds < 30, (rank, cut)
        assert "stage 1 (pipeline rank 1 (global rank 1)): microbatch 0 produced no gradient" in message, (rank, cut)
        assert again[0] == "PipelineError" and "produced no gradient" in again[1], (rank, again)  # stays failed
    ends = [[[torch.tensor(g) for g in step] for step in r[4]] for r in results]
    (first1,), (first2,) = ends[0]
    (last1,), (last2,) = ends[-1]
    assert all(tied == [[], []] for tied in ends[1:-1])
    assert torch.equal(first1, last1) and torch.equal(first2, last2)  # both ends: the same bits
    torch.testing.assert_close(first2, 2 * first1)  # accumulated, not summed twice
    for rank, (kind, message, seconds) in enumerate(r[6] for r in results):
        assert kind == "RuntimeError" and "a failure the others missed" in message, (rank, message)
        assert seconds < 10, (rank, message, seconds)
    for rank, (boom, late) in enumerate(r[5] for r in results if world == 2):
        (kind, message, seconds), later = boom
        assert kind == "PipelineError" and "boom in a layer" in message and seconds < 10, (rank, boom)
        # the failed call aborted the mesh's communicators: a new runner on it is refused
        assert later[0] == "RuntimeError" and "communicators were aborted" in later[1], (rank, later)
        (kind, message, seconds), _ = late
        assert kind == "PipelineError" and "timed out after 2 s" in message and seconds < 10, (rank, late)
    trace = json.load(open(tmp_path / "trace0.json"))
    names = {e["name"] for e in trace["traceEvents"]}
    assert "0F0" in names and all(e["ph"] == "X" and e["dur"] >= 0 for e in trace["traceEvents"])


def test_layouts_without_one_neighbour_per_side_are_refused():
    from tandem.pipeline.ir import StageLayout
    from tandem.pipeline.runtime import _neighbours

    assert _neighbours(StageLayout.looped(4, 2), 0) == (3, 1)  # interleaved: a ring
    assert _neighbours(StageLayout.looped(4), 0) == (None, 1)
    assert _neighbours(StageLayout.looped(4), 3) == (2, None)
    assert _neighbours(StageLayout((0, 1, 1, 0)), 0) == (1, 1)  # a V over 2 ranks: both neighbours are 1
    v_shape = StageLayout((0, 1, 2, 3, 3, 2, 1, 0))
    with pytest.raises(ValueError, match=r"pipeline rank 1 exchanges activations with ranks \[0, 2\]"):
        _neighbours(v_shape, 1)
    with pytest.raises(ValueError, match=r"rank 0 exchanges activations with ranks \[1\] \(before it\) and "
                                         r"\[1\] \(after it\); the runtime needs them from rank 3 and to rank 1"):
        _neighbours(v_shape, 0)
    with pytest.raises(ValueError, match=r"rank 2 exchanges activations with ranks \[0\] \(before it\) and \[1\]"):
        _neighbours(StageLayout((0, 2, 1, 3)), 2)  # permuted: its two edges would share a fork


def test_board_keys_are_per_mesh_and_call():
    """Error-board keys: every rank of a mesh derives the same sequence (init_mesh numbers
    meshes collectively; that ranks agree is what the multi-rank failure tests rely on),
    meshes never share one, per-replica keys differ between dp replicas, a groupless mesh
    gets keys of its own."""
    from tandem.mesh import Mesh

    def mesh(serial, rank=0):
        return Mesh(tp=1, pp=2, dp=2, rank=rank, device=torch.device("cpu"), _serial=serial)

    a, a_peer, b = mesh(3), mesh(3, rank=3), mesh(4)
    assert [a.board_key("runner") for _ in range(2)] == [a_peer.board_key("runner") for _ in range(2)] \
        == ["tandem/runner/mesh3/0", "tandem/runner/mesh3/1"]
    assert b.board_key("runner") == "tandem/runner/mesh4/0"
    assert a.board_key("generate", per_replica=True) == "tandem/generate/mesh3/dp0/0"
    assert a_peer.board_key("generate", per_replica=True) == "tandem/generate/mesh3/dp1/0"  # rank 3: dp 1
    single = Mesh.single()
    assert single.board_key("runner") != Mesh.single().board_key("runner")


def test_generate_refuses_bad_arguments_in_one_process():
    """generate's own checks, each naming the argument (one process: no agreement needed)."""
    from tandem.mesh import Mesh
    from tandem.models import GPT, GPTConfig
    from tandem.pipeline import generate, split

    mesh = Mesh.single()
    model = GPT(GPTConfig(vocab_size=32, max_seq_len=16, num_layers=1, hidden_size=16, num_heads=2), mesh=mesh)
    stage, prompt = split(model.layers(), 1, stage=0), torch.zeros(2, 3, dtype=torch.long)
    cases = [({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
             ({"timeout": 0}, "timeout must be a finite number of seconds > 0, got 0"),
             ({"seed": "x"}, "seed must be an int, got 'x'"),
             ({"seed": 1 << 41}, "seed must be in 0 .. 2\\*\\*40 - 1, got 2199023255552")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(stage, prompt, 2, mesh=mesh, **kwargs)
    assert generate(stage, prompt, 2, mesh=mesh, seed=5, temperature=0.5).shape == (2, 5)


def test_generate_agreement_that_times_out_aborts_the_communicator():
    """A peer that never joins the agreement: PipelineError naming the wait, and the mesh,
    whose collectives are now out of step, is aborted (later use says so)."""
    from tandem.mesh import Mesh
    from tandem.pipeline import PipelineError
    from tandem.pipeline._transport import ErrorBoard
    from tandem.pipeline._agree import agree

    class Work:
        def wait_for(self, seconds):
            return False

    class Comm:
        aborted = False

        def all_reduce(self, t, op):
            return Work()

        def abort(self):
            self.aborted = True

    comm = Comm()
    mesh = Mesh(tp=1, pp=2, dp=1, rank=0, device=torch.device("cpu"))
    mesh._comms["pp"] = comm
    with pytest.raises(PipelineError, match="generate's argument check over pp: no answer within 0.5 s .*"
                                            "the mesh's communicators were aborted"):
        agree(mesh, ("pp", "tp"), ErrorBoard("tandem/test/agree"), None, {"seed": (1, "1")}, 0.5,
              "pipeline rank 0", "generate")
    assert comm.aborted
    with pytest.raises(RuntimeError, match="communicators were aborted after a failure .*no answer within"):
        mesh.pp_comm


def test_tied_gradients_accumulate_with_both_ends_on_one_rank():
    """Interleaved on one rank: the embedding (stage 0) and its tied copy (stage 1) both hold
    the model's gradient after one step, twice it after two (no double counting)."""
    from tandem.mesh import Mesh
    from tandem.models import GPT, GPTConfig
    from tandem.nn import vocab_parallel_cross_entropy
    from tandem.pipeline import Interleaved1F1B, PipelineRunner, split

    cfg = GPTConfig(vocab_size=32, max_seq_len=8, num_layers=2, hidden_size=16, num_heads=2, tie_embeddings=True)
    mesh = Mesh.single()
    g = torch.Generator().manual_seed(5)
    ids, targets = torch.randint(0, 32, (4, 8), generator=g), torch.randint(0, 32, (4, 8), generator=g)
    torch.manual_seed(0)
    ref = GPT(cfg, mesh=mesh)
    ref(ids, targets).backward()
    torch.manual_seed(0)
    model = GPT(cfg, mesh=mesh)
    stages = [split(model.layers(), 2, balance="uniform", stage=s) for s in (0, 1)]
    runner = PipelineRunner(stages, mesh=mesh, schedule=Interleaved1F1B(1, 2, virtual_stages=2),
                            num_microbatches=2, loss_fn=lambda y, t: vocab_parallel_cross_entropy(y, t, mesh=mesh))
    (emb, _), = stages[0].tied.values()
    (copy, _), = stages[1].tied.values()
    for k in (1, 2):
        runner.step(ids, targets)
        torch.testing.assert_close(emb.grad, k * ref.embed.tok.weight.grad, msg=f"after {k} steps")
        assert torch.equal(emb.grad, copy.grad)


def test_a_closed_runner_refuses_calls():
    from tandem.mesh import Mesh
    from tandem.pipeline import GPipe, PipelineError, PipelineRunner, split

    runner = PipelineRunner(split(_layers(2), 1, stage=0), mesh=Mesh.single(), schedule=GPipe(1, 2),
                            loss_fn=nn.functional.mse_loss, num_microbatches=2)
    x, y = _batch(4)
    runner.step(x, y)
    runner.close()
    for call in (lambda: runner.step(x, y), lambda: runner.forward(x)):
        with pytest.raises(PipelineError, match=r"pipeline rank 0 \(global rank 0\): the runner was closed"):
            call()
