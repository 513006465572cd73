"""tandem's GPT through the pipeline on 4 gloo ranks, against tp = 1, pp = 1 in one process,
GPT-2-class and Llama-class (RMSNorm, RoPE, SwiGLU, GQA, q/k/v biases):

- tp=2 x pp=2, ZB-H1 (split B/W with TP collectives), tied embeddings: loss, every
  weight after 3 SGD steps, and the embedding and its copy on the last stage bitwise equal;
- dp=2 x pp=2, interleaved 1F1B (two stages per rank) and ZB-H1: the same over 3 SGD steps,
  with the dp all-reduce of most gradient buckets started during the last backward; dp=4
  with one stage under ZB-H1 (a tied weight written by two deferred pieces per microbatch);
- pipelined greedy decoding equals GPT.generate token for token (tp=2 x pp=2, two request
  groups in flight), and sampled decoding equals the one-stage run with the same seed, with
  top-k, top-p, left-padded prompts and EOS too; a
  rank that refuses its arguments, or prompts that differ between ranks, fail every rank at
  once, and the next call decodes as before.

One spawned world runs all cases (a 4-rank world costs ~10 s to start here).
"""

import pytest
import torch
import torch.distributed as dist

from distributed import outcome, run_ranks

STEPS, LR = 3, 0.5
_KIND = "gpt2"  # set in each worker process


def _config():
    from tandem.models import GPTConfig

    if _KIND == "llama":
        return GPTConfig(vocab_size=64, max_seq_len=16, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                         ffn_hidden_size=48, tie_embeddings=True, bias=False, qkv_bias=True, activation="swiglu",
                         norm="rmsnorm", norm_eps=1e-6, position="rope", rope_theta=500.0)
    return GPTConfig(vocab_size=64, max_seq_len=16, num_layers=2, hidden_size=32, num_heads=4,
                     tie_embeddings=True)


def _model(mesh):
    from tandem.models import GPT

    torch.manual_seed(0)
    return GPT(_config(), mesh=mesh)


def _data(b=8, s=8):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (b, s), generator=g)
    return ids, torch.randint(0, 64, (b, s), generator=g)


def _reference():
    from tandem.mesh import Mesh

    model = _model(Mesh.single())
    ids, targets = _data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(ids, targets)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return model, losses


def _train(mesh, schedule, stage_ids, rows, **runner_args):
    from tandem.nn import vocab_parallel_cross_entropy
    from tandem.pipeline import PipelineRunner, split

    model = _model(mesh)
    num_stages = schedule.num_stages
    stages = [split(model.layers(), num_stages, balance="uniform", stage=s) for s in stage_ids]
    runner = PipelineRunner(stages if len(stages) > 1 else stages[0], mesh=mesh, schedule=schedule,
                            loss_fn=lambda logits, t: vocab_parallel_cross_entropy(logits, t, mesh=mesh),
                            num_microbatches=schedule.num_microbatches, timeout=60, **runner_args)
    opt = torch.optim.SGD(runner.parameters(), lr=LR)
    ids, targets = _data()
    ids, targets = ids[rows], targets[rows]
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        losses.append(runner.step(ids if 0 in stage_ids else None,
                                  targets if num_stages - 1 in stage_ids else None))
        opt.step()
        if runner.reducer is not None:  # dp: buckets all-reduced while the backward ran
            assert runner.reducer.started_early >= 2, runner.reducer.started_early
    runner.close()  # hooks off the parameters, link aborted
    assert runner.reducer is None and runner.p2p is None
    return stages, losses


def _check_weights(stages, ref, mesh, what):
    from tandem.nn import _collectives as C

    ref_layers = ref.layers()
    for st in stages:
        for i in st.layer_indices:
            got, want = st.layers[str(i)].full_state_dict(), ref_layers[i].full_state_dict()
            for k in want:
                torch.testing.assert_close(got[k], want[k], msg=lambda m: f"{what} layer {i} {k}: {m}")
        for name, (param, _) in st.tied.items():
            full = param.detach() if mesh.tp == 1 else C.all_gather(param.detach(), mesh.tp_comm, 0)
            torch.testing.assert_close(full, ref.embed.tok.weight, msg=lambda m: f"{what} {name}: {m}")


def _tied_values(stages):
    return [p.detach().clone() for st in stages for p, _ in st.tied.values()]


def _worker(rank, world, kind):
    import tandem
    from tandem.pipeline import Interleaved1F1B, ZeroBubbleH1, generate, split

    global _KIND
    _KIND = kind
    ref, ref_losses = _reference()
    out = {}

    # --- tp=2 x pp=2, ZB-H1, tied embeddings ------------------------------------------------
    mesh = tandem.init_mesh(tp=2, pp=2)
    sched = ZeroBubbleH1(2, 4)
    stages, losses = _train(mesh, sched, [mesh.pp_rank], slice(None))
    for got, want in zip(losses, ref_losses):
        torch.testing.assert_close(got, want, msg="tp x pp loss")
    _check_weights(stages, ref, mesh, "tp x pp")
    tied = _tied_values(stages)
    assert len(tied) == 1  # stage 0 holds the embedding, stage 1 its copy
    values = [None] * world
    dist.all_gather_object(values, tied[0])
    # ranks (tp 0, pp 0) and (tp 0, pp 1) hold the same shard: bitwise equal after 3 steps
    partner = mesh.global_rank(tp_rank=mesh.tp_rank, dp_rank=0, pp_rank=1 - mesh.pp_rank)
    assert torch.equal(values[rank], values[partner]), "tied embedding and its copy diverged"

    # --- greedy and sampled decoding through the tp=2 x pp=2 pipeline ---------------------------
    prompt = _data(4, 5)[0]
    model = _model(mesh)
    stage = split(model.layers(), 2, balance="uniform")
    got = generate(stage, prompt, 6, mesh=mesh)
    want = ref_model_generate(prompt, 6)
    assert torch.equal(got, want), f"greedy decoding differs:\n{got}\n{want}"
    sampled = generate(stage, prompt, 6, mesh=mesh, temperature=0.8, seed=7)
    one_stage = _model(tandem.Mesh.single())
    alone = generate(split(one_stage.layers(), 1, stage=0), prompt, 6, mesh=tandem.Mesh.single(),
                     temperature=0.8, seed=7)
    assert torch.equal(sampled, alone), "sampled decoding depends on the pipeline"
    assert torch.equal(sampled[:, :5], prompt) and int(sampled.max()) < 64
    out["greedy"] = got.tolist()
    # left-padded prompts of different lengths, top-k / top-p sampling and EOS: the pipeline
    # gives what the whole model's generate gives (rows that ended get the pad token)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    mask[3, :1] = 0
    padded = prompt.masked_fill(mask == 0, 0)
    eos = int(want[1, 7])  # the third new token of row 1: that row, at least, ends early
    for kw in (dict(), dict(temperature=0.9, top_k=5, top_p=0.8, seed=3)):
        args = dict(attention_mask=mask, eos_token_id=eos, pad_token_id=63, **kw)
        want_padded = one_stage.generate(padded, 6, **args)
        got_padded = generate(stage, padded, 6, mesh=mesh, **args)
        assert torch.equal(got_padded, want_padded), f"padded decoding {kw} differs:\n{got_padded}\n{want_padded}"
        assert (want_padded[1, 8:] == 63).all()
    # every token ends a row: every rank returns the prompt and one token
    ended = generate(stage, prompt, 6, mesh=mesh, eos_token_id=list(range(64)))
    assert ended.shape == (4, 6) and torch.equal(ended, want[:, :6]), ended
    # one rank refuses its arguments: it raises its ValueError, every other rank its message,
    # at once; ranks whose prompts differ all refuse; no collective is left half-issued, so
    # the next call decodes as before
    bad = mesh.pp_rank == 1 and mesh.tp_rank == 0
    out["refused"] = outcome(lambda: generate(stage, prompt, 0 if bad else 6, mesh=mesh, timeout=60))
    short = prompt[:, :4] if mesh.pp_rank == 1 else prompt
    out["mismatch"] = [outcome(lambda: generate(stage, short, 6, mesh=mesh, timeout=60))]
    other = prompt.clone()
    other[1, 2] += mesh.pp_rank  # same shape, one token differs
    out["mismatch"].append(outcome(lambda: generate(stage, other, 6, mesh=mesh, timeout=60)))
    seed = 7 + mesh.tp_rank  # tp ranks of the last stage would sample different tokens
    out["seed"] = outcome(lambda: generate(stage, prompt, 6, mesh=mesh, temperature=0.8, seed=seed, timeout=60))
    # a refused timeout: the agreement waits with a default instead, nothing is aborted
    out["timeout"] = outcome(lambda: generate(stage, prompt, 6, mesh=mesh, timeout=-1.0 if bad else 60))
    assert torch.equal(generate(stage, prompt, 6, mesh=mesh), want), "decoding after refused calls"
    out["bad"] = bad
    # a failure while decoding (the streaming callback of one tp rank of the last stage raises
    # at step 2; its tp peer waits in the next argmax all-reduce): every rank stops with it at
    # once, and the mesh, whose communicators may hold the call's collectives, refuses later use

    def on_token(rows, tokens, calls=[]):  # noqa: B006 (counts this call's tokens)
        calls.append(rows)
        if mesh.tp_rank == 0 and len(calls) == 2 * 2 + 1:  # two groups per step: step 2, group 0
            raise RuntimeError("the client went away")

    out["decode_failure"] = outcome(lambda: generate(stage, prompt, 6, mesh=mesh, timeout=60, on_token=on_token))
    out["after_failure"] = outcome(lambda: generate(stage, prompt, 6, mesh=mesh, timeout=60))

    # --- dp=2 x pp=2: interleaved 1F1B with two stages per rank, and ZB-H1 (deferred W) ------
    # small buckets: most start their dp all-reduce during the stage's last backward
    mesh = tandem.init_mesh(tp=1, pp=2, dp=2)
    rows = slice(4 * mesh.dp_rank, 4 * mesh.dp_rank + 4)  # each replica its half of the batch
    for sched in (Interleaved1F1B(2, 2, virtual_stages=2), ZeroBubbleH1(2, 2)):
        stages, losses = _train(mesh, sched, list(sched.layout.stages_of(mesh.pp_rank)), rows,
                                dp_bucket_bytes=2048)
        for got, want in zip(losses, ref_losses):
            torch.testing.assert_close(got, want, msg=f"dp x pp loss, {sched}")
        _check_weights(stages, ref, mesh, f"dp x pp, {sched}")

    # --- dp=4, one stage, ZB-H1: the tied embedding gets two deferred pieces per microbatch
    # (embedding and head); its bucket starts only after the last of them ---------------------
    mesh = tandem.init_mesh(tp=1, pp=1, dp=4)
    rows = slice(2 * mesh.dp_rank, 2 * mesh.dp_rank + 2)
    stages, losses = _train(mesh, ZeroBubbleH1(1, 2), [0], rows, dp_bucket_bytes=2048)
    for got, want in zip(losses, ref_losses):
        torch.testing.assert_close(got, want, msg="dp=4 ZB-H1 loss")
    _check_weights(stages, ref, mesh, "dp=4 ZB-H1")
    return out


def ref_model_generate(prompt, n):
    import tandem

    return _model(tandem.Mesh.single()).generate(prompt, n)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gpt_3d_training_and_generation(kind):
    results = run_ranks(4, _worker, kind, timeout=300)
    assert all(r["greedy"] == results[0]["greedy"] for r in results)
    for rank, r in enumerate(results):
        kind, message, seconds = r["refused"]
        assert seconds < 30, (rank, r["refused"])
        if r["bad"]:
            assert kind == "ValueError" and "max_new_tokens must be an int >= 1, got 0" in message, (rank, message)
        else:
            assert kind == "PipelineError", (rank, r["refused"])
            assert "pipeline rank 1" in message and "refused generate" in message, (rank, message)
            assert "max_new_tokens must be an int >= 1, got 0" in message, (rank, message)
        for kind, message, seconds in r["mismatch"]:
            assert kind == "PipelineError" and seconds < 30, (rank, message)
            assert message.endswith("called generate with different prompt"), (rank, message)
        kind, message, seconds = r["timeout"]
        assert seconds < 30 and "timeout must be a finite number of seconds > 0, got -1.0" in message, (rank, message)
        assert kind == ("ValueError" if r["bad"] else "PipelineError"), (rank, kind)
        kind, message, seconds = r["seed"]
        assert kind == "PipelineError" and seconds < 30, (rank, message)
        assert "with different seed (this rank: seed=" in message, (rank, message)
        kind, message, seconds = r["decode_failure"]
        assert kind == "PipelineError" and "the client went away" in message and seconds < 30, (rank, message)
        kind, message, _ = r["after_failure"]
        assert kind == "RuntimeError" and "communicators were aborted" in message, (rank, message)
    assert sum(r["bad"] for r in results) == 1
