"""tandem.resume and the training parts of tandem.checkpoint: AdamW's state saved at tp=2 and
loaded at tp=1 (and back), every RNG state per rank, which checkpoint a run resumes from
(never a .partial one), pruning."""

import os
import random

import numpy as np
import pytest
import torch

from distributed import run_ranks
from tandem import checkpoint, resume


def _tiny():
    from tandem.models import GPTConfig

    return GPTConfig(vocab_size=64, max_seq_len=16, num_layers=2, hidden_size=32, num_heads=4, norm="rmsnorm",
                     position="rope", activation="swiglu", bias=False, ffn_hidden_size=64)


def _train(model, opt, steps):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 16), generator=g)
        model(ids, ids).backward()
        opt.step()
        opt.zero_grad()


def _optimizer_state_moves_between_tp_sizes(rank, world, path):
    import tandem
    from tandem.mesh import Mesh
    from tandem.models import GPT

    mesh = tandem.init_mesh(tp=2)
    torch.manual_seed(0)
    model = GPT(_tiny(), mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    torch.manual_seed(1234 + rank)
    np.random.seed(rank)
    random.seed(rank)
    state = resume.rng_keys(rank, resume.rng_state())
    draws = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.save(model, path, optimizer=opt, state=state, extra={"step": 2})
    # the same weights and states at tp=1, in a fresh optimizer whose state does not exist yet
    torch.manual_seed(5)
    plain = GPT(_tiny(), mesh=Mesh.single())
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    checkpoint.load(plain, path, optimizer=popt)
    shards, sections = checkpoint._placements(model), checkpoint._sections(model)
    pnames = {id(p): n for n, p in plain.named_parameters()}
    full_state = {pnames[id(p)]: s for p, s in popt.state.items()}
    checked = 0
    for name, p in model.named_parameters():
        mine = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            full = full_state[name][key]
            if name in shards:  # this rank's shard of the full state (of each section)
                dim, _ = shards[name]
                n = sections.get(name, 1)
                full = full.view(n, -1, *full.shape[1:]).chunk(2, dim=dim + 1)[mesh.tp_rank].reshape(mine[key].shape)
            assert torch.equal(full, mine[key]), (name, key)
            checked += 1
        assert float(full_state[name]["step"]) == float(mine["step"]) == 2.0
    # the RNG states come back
    saved = resume.saved_rng(path, rank)
    assert saved is not None and resume.saved_rng(path, 7) is None
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    checkpoint.load(model, path, state=saved)
    resume.set_rng_state(resume.rng_from_keys(rank, saved))
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]
    return checked


def test_optimizer_state_and_rng_at_another_tp(tmp_path):
    checked = run_ranks(2, _optimizer_state_moves_between_tp_sizes, str(tmp_path / "ckpt"))
    assert checked[0] == checked[1] > 10


def test_latest_resolve_prune_ignore_partial_checkpoints(tmp_path):
    from tandem.mesh import Mesh
    from tandem.models import GPT

    run = str(tmp_path / "run")
    model = GPT(_tiny(), mesh=Mesh.single())
    for step in (10, 20, 30):
        checkpoint.save(model, resume.step_dir(run, step), extra={"step": step})
    os.rename(resume.step_dir(run, 30), resume.step_dir(run, 30) + ".partial")  # died while writing 30
    assert [s for s, _ in resume.list_steps(run)] == [10, 20]
    assert resume.latest(run) == resume.step_dir(run, 20)
    assert resume.resolve("", run) == resume.step_dir(run, 20)
    assert resume.resolve(run, "elsewhere") == resume.step_dir(run, 20)
    assert resume.resolve(resume.step_dir(run, 10), run) == resume.step_dir(run, 10)
    with pytest.raises(FileNotFoundError, match="an interrupted save left PATH.partial"):
        resume.resolve(resume.step_dir(run, 30), run)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in '.*empty/checkpoints'"):
        resume.resolve("", str(tmp_path / "empty"))
    os.remove(os.path.join(resume.step_dir(run, 10), "tandem.json"))  # incomplete
    with pytest.raises(FileNotFoundError, match="is not a complete tandem checkpoint"):
        resume.resolve(resume.step_dir(run, 10), run)
    checkpoint.save(model, resume.step_dir(run, 40), extra={"step": 40})
    gone = resume.prune(run, keep=1)
    assert sorted(os.path.basename(p) for p in gone) == ["step-00000020", "step-00000030.partial"]
    assert [s for s, _ in resume.list_steps(run)] == [40]
