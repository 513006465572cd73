"""pipeline.split / partition: every layer in exactly one stage, the balances, tied
embeddings, and the errors; plus PipelineRunner in one process (two stages on one rank,
handing data over locally) and its argument errors, raised before any communication."""

import itertools
import time

import pytest
import torch
from torch import nn

from tandem.mesh import Mesh
from tandem.models import GPT, GPTConfig
from tandem.pipeline import (GPipe, Interleaved1F1B, OneFOneB, PipelineError, PipelineRunner,
                             ZeroBubbleH1, partition, split)


def _gpt(tie=False, layers=4):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, max_seq_len=16, num_layers=layers, hidden_size=32,
                         num_heads=4, tie_embeddings=tie), mesh=Mesh.single())


@pytest.mark.parametrize("balance", ["params", "uniform"])
def test_every_layer_in_exactly_one_stage(balance):
    layers = _gpt(layers=5).layers()  # embed + 5 blocks + head = 7 layers
    for n in range(1, len(layers) + 1):
        stages = [split(layers, n, balance=balance, stage=s) for s in range(n)]
        indices = [i for st in stages for i in st.layer_indices]
        assert indices == list(range(len(layers))), (n, indices)
        assert all(len(st.layer_indices) >= 1 for st in stages)
        part = stages[0].partition
        assert sum(part.layers_per_stage) == len(layers)
        assert sum(part.params_per_stage) == sum(p.numel() for p in _gpt(layers=5).parameters())


def test_uneven_split_is_reported():
    layers = _gpt(layers=3).layers()  # 5 layers
    part = partition(layers, 2, balance="uniform")
    assert sorted(part.layers_per_stage) == [2, 3]
    text = str(part)
    assert "partition of 5 layers into 2 stages" in text and "GPTHead" in text
    assert partition(layers, 3, balance=[1, 3, 1]).layers_per_stage == (1, 3, 1)


def test_params_balance_minimises_the_largest_stage():
    layers = [nn.Linear(n, n) for n in (2, 9, 3, 3, 8, 1, 5)]
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    part = partition(layers, 3, balance="params")
    best = min(max(sum(sizes[a:b]) for a, b in zip((0, i, j), (i, j, len(sizes))))
               for i, j in itertools.combinations(range(1, len(sizes)), 2))
    assert max(part.params_per_stage) == best


class _Slow(nn.Linear):
    def forward(self, x):
        time.sleep(0.02)
        return super().forward(x)


def test_time_balance_isolates_the_slow_layer():
    layers = [nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), _Slow(4, 4)]
    assert partition(layers, 2, balance="params").layers_per_stage == (2, 2)
    part = partition(layers, 2, balance="time", sample_input=torch.randn(2, 4), repeats=1)
    assert part.layers_per_stage == (3, 1), str(part)
    with pytest.raises(ValueError, match="sample_input"):
        partition(layers, 2, balance="time")
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        partition(layers, 2, balance="time", sample_input=torch.randn(2, 4), repeats=0)


def test_split_errors():
    layers = _gpt().layers()
    with pytest.raises(ValueError, match="cannot fill 9 stages"):
        split(layers, 9, stage=0)
    with pytest.raises(ValueError, match="covers 5 layers"):
        split(layers, 2, balance=[2, 3], stage=0)
    with pytest.raises(ValueError, match="ints >= 1"):
        split(layers, 2, balance=[6, 0], stage=0)
    with pytest.raises(ValueError, match="balance must be"):
        split(layers, 2, balance="flops", stage=0)
    with pytest.raises(ValueError, match="stage must be an int in 0..1"):
        split(layers, 2, stage=2)
    with pytest.raises(ValueError, match="num_stages == pp"):
        split(layers, 2, mesh=Mesh.single())
    with pytest.raises(TypeError, match="nn.Modules"):
        split([nn.Linear(2, 2), "relu"], 1, stage=0)


def test_tied_head_gets_its_own_copy():
    model = _gpt(tie=True)
    layers = model.layers()
    first, last = split(layers, 2, stage=0), split(layers, 2, stage=1)
    (src_name, (src, peer0)), = first.tied.items()
    (dst_name, (dst, peer1)), = last.tied.items()
    assert (peer0, peer1) == (1, 0) and src is model.embed.tok.weight
    assert dst is not src and torch.equal(dst, src)
    assert model.head.weight is model.embed.tok.weight  # the model itself stays tied
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(last(first(ids)), model(ids))
    assert dst in set(last.parameters()) and src not in set(last.parameters())
    # on one stage nothing is copied
    assert split(layers, 1, stage=0).tied == {}


def _mse_runner(schedule, stages):
    return PipelineRunner(stages, mesh=Mesh.single(), schedule=schedule,
                          loss_fn=nn.functional.mse_loss, num_microbatches=schedule.num_microbatches)


@pytest.mark.parametrize("schedule", [Interleaved1F1B(1, 3, virtual_stages=2), ZeroBubbleH1(1, 2)],
                         ids=["interleaved-v2", "zb-h1"])
def test_one_rank_matches_the_model(schedule):
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(4)]
    ref = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(4)])
    ref.load_state_dict(nn.Sequential(*layers).state_dict())
    x, y = torch.randn(6, 6), torch.randn(6, 6)
    n = schedule.num_stages
    stages = [split(layers, n, balance="uniform", stage=s) for s in range(n)]
    loss = _mse_runner(schedule, stages if n > 1 else stages[0]).step(x, y)
    ref_loss = nn.functional.mse_loss(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    for got, want in zip(layers, ref):
        for p, q in zip(got.parameters(), want.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


class _SoloComm:
    """A pp communicator of which this rank is the only member that answers: the runner's
    agreement (one MAX all-reduce) completes at once; anything else would fail."""

    class _Done:
        def wait_for(self, seconds):
            return True

        def wait(self, timeout=None):
            return None

    def all_reduce(self, t, op="sum"):
        return self._Done()


def test_runner_argument_errors_come_before_any_message():
    # a pp=2 mesh whose pp group only holds the agreement: a message or link would fail differently
    mesh = Mesh(tp=1, pp=2, dp=1, rank=0, device=torch.device("cpu"))
    mesh._comms["pp"] = _SoloComm()
    stage = split([nn.Linear(2, 2), nn.Linear(2, 2)], 2, stage=0)
    kw = dict(mesh=mesh, loss_fn=nn.functional.mse_loss)
    with pytest.raises(ValueError, match=r"num_microbatches \(1\) < num_ranks \(2\)"):
        PipelineRunner(stage, schedule=OneFOneB, num_microbatches=1, **kw)
    with pytest.raises(ValueError, match="must be a multiple of num_ranks"):
        PipelineRunner([stage, stage], schedule=Interleaved1F1B(2, 3, virtual_stages=2),
                       num_microbatches=3, **kw)
    with pytest.raises(ValueError, match="made for 4"):
        PipelineRunner(stage, schedule=GPipe(2, 4), num_microbatches=2, **kw)
    with pytest.raises(ValueError, match="the mesh has pp=2"):
        PipelineRunner(stage, schedule=GPipe(3, 4), num_microbatches=4, **kw)
    with pytest.raises(ValueError, match=r"holds stages \[0, 2\].*1 stage module"):
        PipelineRunner(stage, schedule=Interleaved1F1B(2, 2, virtual_stages=2), num_microbatches=2, **kw)
    with pytest.raises(ValueError, match="was given stage 1"):
        PipelineRunner(split([nn.Linear(2, 2)] * 2, 2, stage=1), schedule=GPipe, num_microbatches=2, **kw)
    with pytest.raises(ValueError, match="num_microbatches must be an int"):
        PipelineRunner(stage, schedule=GPipe, num_microbatches=0, **kw)
    for timeout in (float("nan"), "5", 0, True):
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            PipelineRunner(stage, schedule=GPipe, num_microbatches=2, timeout=timeout, **kw)
    with pytest.raises(ValueError, match="dp_bucket_bytes must be an int >= 1, got -1"):
        PipelineRunner(stage, schedule=GPipe, num_microbatches=2, dp_bucket_bytes=-1, **kw)
    with pytest.raises(TypeError, match=r"schedule\(2, 2\) returned 'gpipe', not a Schedule"):
        PipelineRunner(stage, schedule=lambda p, m: "gpipe", num_microbatches=2, **kw)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        PipelineRunner(stage, schedule=GPipe, num_microbatches=2, mesh=mesh, loss_fn="mse")


def test_bad_batch_is_a_clear_error():
    runner = _mse_runner(GPipe(1, 2), split([nn.Linear(2, 2)], 1, stage=0))
    with pytest.raises(PipelineError, match="divisible by num_microbatches=2"):
        runner.step(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(PipelineError, match="divisible"):  # a failed runner stays failed
        runner.step(torch.randn(4, 2), torch.randn(4, 2))
    runner = _mse_runner(GPipe(1, 2), split([nn.Linear(2, 2)], 1, stage=0))
    with pytest.raises(PipelineError, match="targets must be a Tensor"):
        runner.step(torch.randn(4, 2), None)
