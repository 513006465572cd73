"""The pipeline runtime on one GPU (skipped without CUDA): PipelineRunner with pp = 1 on
CUDA (timelines from CUDA events, deferred weight gradients through the fused CUDA ops)
against the model's own step, its timeline anchored to the host clock, and greedy
decoding against GPT.generate. Multi-GPU pipelines are covered by the gloo tests and the
two-GPU StageLink test."""

import time

import pytest
import torch

pytestmark = pytest.mark.cuda


def _model(mesh):
    from tandem.models import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=96, max_seq_len=16, num_layers=2, hidden_size=64, num_heads=4)
    return GPT(config, mesh=mesh, device="cuda")


def _data(b=8, s=12):
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, 96, (b, s), generator=g).cuda(), torch.randint(0, 96, (b, s), generator=g).cuda())


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_runner_on_one_gpu_matches_the_model(schedule):
    from tandem.mesh import Mesh
    from tandem.nn import vocab_parallel_cross_entropy
    from tandem.pipeline import OneFOneB, PipelineRunner, ZeroBubbleH1, split

    mesh = Mesh.single(device="cuda")
    ids, targets = _data()
    ref = _model(mesh)
    want = ref(ids, targets)
    want.backward()
    model = _model(mesh)
    sched = (OneFOneB if schedule == "1f1b" else ZeroBubbleH1)(1, 4)
    runner = PipelineRunner(split(model.layers(), 1, stage=0), mesh=mesh, schedule=sched,
                            loss_fn=lambda y, t: vocab_parallel_cross_entropy(y, t, mesh=mesh),
                            num_microbatches=4, timeout=60)
    torch.cuda.synchronize()
    before = time.perf_counter()
    loss = runner.step(ids, targets)
    torch.cuda.synchronize()
    after = time.perf_counter()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-4, atol=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    timeline = runner.resolve_timeline()
    assert len(timeline) == len(runner.lowered) == 4 * (3 if sched.split_backward else 2)
    starts = [rec.start_s for rec in timeline]
    assert starts == sorted(starts) and all(rec.end_s >= rec.start_s for rec in timeline)
    # event times turned into host times: inside the step's host window (1 ms slack)
    assert before - 1e-3 <= timeline[0].start_s and timeline[-1].end_s <= after + 1e-3, \
        (before, timeline[0].start_s, timeline[-1].end_s, after)


def test_greedy_decoding_on_one_gpu_matches_the_model():
    from tandem.mesh import Mesh
    from tandem.pipeline import generate, split

    mesh = Mesh.single(device="cuda")
    model = _model(mesh)
    prompt = _data(3, 5)[0]
    got = generate(split(model.layers(), 1, stage=0), prompt, 6, mesh=mesh)
    assert torch.equal(got, model.generate(prompt, 6))
