"""parallelize on transformers' own models (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM,
MistralForCausalLM), float64, against the unparallelized model: logits, the model's own loss
(labels path; the head is gathered), every parameter gradient (gathered to full), one SGD step
and greedy generate. tp=2 and tp=4 on gloo, one spawn per degree running every case."""

import copy

import pytest
import torch

from distributed import run_ranks
from tp_utils import assert_dicts_close, full_grads

VOCAB, SEQ, BATCH = 32, 8, 2
TOL = dict(rtol=1e-10, atol=1e-12)  # float64: only the summation order differs


def _gpt2(attn, tie=True, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**{**dict(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=4, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2), **kw},
                     tie_word_embeddings=tie, attn_implementation=attn)
    return GPT2LMHeadModel(cfg)


def _llama_like(arch, attn, heads=4, kv=2, hidden=32, ffn=48, tie=False, **kw):
    import transformers

    config_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    cfg = config_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie, attn_implementation=attn, **kw)
    return model_cls(cfg)


def _cases():
    """(name, builder, plan name) for every model variant."""
    cases = []
    for attn in ("eager", "sdpa"):
        cases += [
            (f"gpt2 tied {attn}", lambda a=attn: _gpt2(a), "GPT2_PLAN"),
            (f"llama kv=2 {attn}", lambda a=attn: _llama_like("Llama", a), "LLAMA_PLAN"),
            (f"qwen2 kv=2 tied {attn}", lambda a=attn: _llama_like("Qwen2", a, tie=True), "LLAMA_PLAN"),
            (f"mistral kv=2 window=4 {attn}", lambda a=attn: _llama_like("Mistral", a, sliding_window=4),
             "LLAMA_PLAN"),
        ]
    cases += [
        ("gpt2 untied scaled", lambda: _gpt2("eager", tie=False, scale_attn_by_inverse_layer_idx=True), "GPT2_PLAN"),
        ("llama mqa kv=1 tied pad=0", lambda: _llama_like("Llama", "sdpa", heads=8, kv=1, tie=True, pad_token_id=0),
         "LLAMA_PLAN"),
        ("qwen2 kv=4 pad=0", lambda: _llama_like("Qwen2", "eager", heads=4, kv=4, hidden=16, ffn=32,
                                                 pad_token_id=0), "LLAMA_PLAN"),
    ]
    return cases


def _batch(gen):
    """Token ids with the second row right-padded (id 0, masked, label -100)."""
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    ids[1, -3:], mask[1, -3:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _check_case(name, build, plan, mesh):
    import tandem

    torch.manual_seed(0)
    ref = build().double()
    model = tandem.parallelize(copy.deepcopy(ref), mesh, getattr(tandem, plan))
    assert_dicts_close(tandem.nn.full_state_dict(model), tandem.nn.full_state_dict(ref), f"{name} weights",
                       rtol=0, atol=0)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        ids, mask, labels = _batch(gen)
        out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.logits, out_ref.logits, **TOL, msg=lambda m: f"{name} step {step} logits: {m}")
        torch.testing.assert_close(out.loss, out_ref.loss, **TOL, msg=lambda m: f"{name} step {step} loss: {m}")
        out_ref.loss.backward()
        out.loss.backward()
        assert_dicts_close(full_grads(model), full_grads(ref), f"{name} step {step} grads", **TOL)
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    assert_dicts_close(tandem.nn.full_state_dict(model), tandem.nn.full_state_dict(ref), f"{name} trained", **TOL)
    # inference through transformers' own generate (KV cache, one-token decoding steps)
    prompt = _batch(gen)[0][:1, :4]
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want), f"{name} generate: {got.tolist()} != {want.tolist()}"
    return model


def _structure(model) -> dict:
    """What parallelize made of the first layer (types and local head attributes)."""
    if hasattr(model, "transformer"):
        attn = model.transformer.h[0].attn
        return dict(c_attn=type(attn.c_attn).__name__, c_proj=type(attn.c_proj).__name__,
                    split_size=attn.split_size, num_heads=attn.num_heads,
                    tied=model.lm_head.weight is model.transformer.wte.weight,
                    local_c_attn=tuple(attn.c_attn.weight.shape))
    attn = model.model.layers[0].self_attn
    return dict(k_proj=type(attn.k_proj).__name__, groups=attn.num_key_value_groups,
                tied=model.lm_head.weight is model.model.embed_tokens.weight,
                embed=type(model.model.embed_tokens).__name__)


def _hf_worker(rank, world_size):
    import tandem

    torch.set_num_threads(1)  # ranks share the cores; intra-op threads only contend
    mesh = tandem.init_mesh(tp=world_size)
    return {name: _structure(_check_case(f"tp={world_size} {name}", build, plan, mesh))
            for name, build, plan in _cases()}


@pytest.mark.parametrize("tp", [2, 4])
def test_hf_models_match_unparallelized(tp):
    seen = run_ranks(tp, _hf_worker, timeout=300)
    assert all(s == seen[0] for s in seen)  # every rank converted alike
    s = seen[0]
    assert s["gpt2 tied sdpa"] == dict(c_attn="ColumnParallelConv1D", c_proj="RowParallelConv1D", split_size=16 // tp,
                                       num_heads=4 // tp, tied=True, local_c_attn=(48 // tp, 16))
    assert s["gpt2 untied scaled"]["tied"] is False
    # 4 heads / 2 KV heads: split at tp=2 (2 groups), replicated at tp=4 (1 local q head per KV head)
    assert s["llama kv=2 sdpa"] == dict(k_proj="ColumnParallelLinear" if tp == 2 else "ReplicatedKVProjection",
                                        groups=2 if tp == 2 else 1, tied=False, embed="VocabParallelEmbedding")
    assert s["llama mqa kv=1 tied pad=0"] == dict(k_proj="ReplicatedKVProjection", groups=8 // tp, tied=True,
                                                  embed="PaddedVocabParallelEmbedding")
    assert s["qwen2 kv=2 tied eager"]["tied"] is True


# ---- bad input: every check runs before any module is converted (no communication) ----------

def _tp(n):
    from tandem.mesh import Mesh

    return Mesh(tp=n, pp=1, dp=1, rank=0, device=torch.device("cpu"))


def test_bad_plans_on_hf_models_are_clear_errors():
    import tandem

    with pytest.raises(ValueError, match=r"pattern 'transformer.h.\*.attn.\[qkv\]_proj' matches no module"):
        tandem.parallelize(_gpt2("eager"), _tp(2), {"transformer.h.*.attn.[qkv]_proj": "colwise"})
    with pytest.raises(ValueError, match=r"for this gpt2 model: tandem.GPT2_PLAN"):
        tandem.parallelize(_gpt2("eager"), _tp(2))
    with pytest.raises(ValueError, match=r"for this qwen2 model: tandem.LLAMA_PLAN"):
        tandem.parallelize(_llama_like("Qwen2", "eager"), _tp(2))
    # unsupported module types
    with pytest.raises(TypeError, match=r"'model.layers.0.mlp' is a LlamaMLP, but style 'colwise' applies to "
                                        r"nn.Linear or transformers' Conv1D only"):
        tandem.parallelize(_llama_like("Llama", "eager"), _tp(2), {"model.layers.*.mlp": "colwise"})
    with pytest.raises(TypeError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D, but style 'colwise_kv' "
                                        r"applies to nn.Linear only"):
        tandem.parallelize(_gpt2("eager"), _tp(2), {"transformer.h.*.attn.c_attn": "colwise_kv"})
    with pytest.raises(TypeError, match=r"'lm_head' is a Linear, but style 'vocab' applies to nn.Embedding only"):
        tandem.parallelize(_gpt2("eager"), _tp(2), {"lm_head": "vocab"})
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj'.*needs the head size.*LlamaMLP"):
        tandem.parallelize(_llama_like("Llama", "eager"), _tp(2), {"model.layers.*.mlp.gate_proj": "colwise_kv"})


def test_sizes_tp_does_not_divide_are_named():
    import tandem

    with pytest.raises(ValueError, match=r"'transformer.wte' has num_embeddings=32, which is not divisible by the "
                                         r"tensor-parallel degree tp=3"):
        tandem.parallelize(_gpt2("eager"), _tp(3), tandem.GPT2_PLAN)
    gpt2_6_heads = _gpt2("eager", n_head=6, n_embd=24)
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' has heads \(= section width "
                                         r"\(out_features/3\) 24 / head_dim 4\)=6, which is not divisible by "
                                         r"the tensor-parallel degree tp=4"):
        tandem.parallelize(gpt2_6_heads, _tp(4), tandem.GPT2_PLAN)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj' has num_kv_heads=3 \(out_features=24 / "
                                         r"head_dim=8\), which neither divides nor is divisible by tp=4"):
        tandem.parallelize(_llama_like("Llama", "eager", heads=12, kv=3, hidden=96), _tp(4), tandem.LLAMA_PLAN)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj' has out_features=30, which is not divisible"):
        tandem.parallelize(_llama_like("Llama", "eager", ffn=30), _tp(4), tandem.LLAMA_PLAN)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' has heads \(= out_features 48 / "
                                         r"head_dim 8\)=6, which is not divisible .* tp=4"):
        tandem.parallelize(_llama_like("Llama", "eager", heads=6, kv=2, hidden=48), _tp(4), tandem.LLAMA_PLAN)


def test_tied_weights_need_both_ends_in_the_plan_and_nothing_converts_on_error():
    import tandem

    plan = {k: v for k, v in tandem.GPT2_PLAN.items() if k != "lm_head"}
    model = _gpt2("eager")
    with pytest.raises(ValueError, match=r"'transformer.wte.weight' \(vocab\) is tied to 'lm_head.weight' "
                                         r"\(not in the plan\)"):
        tandem.parallelize(model, _tp(2), plan)
    # the checks ran before any conversion: the model is untouched and still tied
    assert type(model.transformer.wte).__name__ == "Embedding"
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert model.transformer.h[0].attn.split_size == 16
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match=r"'transformer.wte.weight' \(vocab\) is tied to 'lm_head.weight' \(rowwise\)"):
        tandem.parallelize(model, _tp(2), {**tandem.GPT2_PLAN, "lm_head": "rowwise"})


def test_converted_layers_initialise_and_compute_like_their_twins():
    """Built directly (not converted), each layer draws its full weight as its twin does; at tp=1
    it computes what the twin computes; at tp=2 rank 1 holds its sections' slices."""
    from transformers.pytorch_utils import Conv1D

    from tandem.mesh import Mesh
    from tandem.nn.converted import (ColumnParallelConv1D, FusedColumnParallelLinear, PaddedVocabParallelEmbedding,
                                     ReplicatedKVProjection, RowParallelConv1D)

    def twins(make, make_twin, mesh):
        torch.manual_seed(7)
        layer = make(mesh)
        torch.manual_seed(7)
        return layer, make_twin()

    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 5, 3, 5]])
    pairs = {
        "qkv conv1d": twins(lambda m: ColumnParallelConv1D(16, 48, sections=3, mesh=m), lambda: Conv1D(48, 16),
                            Mesh.single()),
        "row conv1d": twins(lambda m: RowParallelConv1D(16, 8, mesh=m), lambda: Conv1D(8, 16), Mesh.single()),
        "fused linear": twins(lambda m: FusedColumnParallelLinear(16, 48, sections=3, mesh=m),
                              lambda: torch.nn.Linear(16, 48), Mesh.single()),
        "padded embedding": twins(lambda m: PaddedVocabParallelEmbedding(8, 16, padding_idx=5, mesh=m),
                                  lambda: torch.nn.Embedding(8, 16, padding_idx=5), Mesh.single()),
    }
    for name, (layer, twin) in pairs.items():
        layer.double(), twin.double()
        assert_dicts_close(layer.full_state_dict(), dict(twin.named_parameters()), f"{name} init", rtol=0, atol=0)
        inp = ids if "embedding" in name else x
        y, y_twin = layer(inp), twin(inp)
        torch.testing.assert_close(y, y_twin, **TOL)  # addmm vs linear: the order of a sum
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        (y_twin * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        assert_dicts_close(full_grads(layer), full_grads(twin), f"{name} grads", **TOL)
    assert float(pairs["padded embedding"][0].weight.grad[5].abs().sum()) == 0.0  # the padding row learns nothing
    # at tp=2 (rank 1; construction does not communicate)
    rank1 = Mesh(tp=2, pp=1, dp=1, rank=1, device=torch.device("cpu"))
    qkv, conv = twins(lambda m: ColumnParallelConv1D(16, 48, sections=3, mesh=m), lambda: Conv1D(48, 16), rank1)
    full = conv.weight.detach().t()  # [q; k; v] rows of 16 each -> rank 1 holds rows 8..16 of each
    torch.testing.assert_close(qkv.weight, torch.cat([full[8:16], full[24:32], full[40:48]]), rtol=0, atol=0)
    kv, lin = twins(lambda m: ReplicatedKVProjection(16, 1, 8, mesh=m), lambda: torch.nn.Linear(16, 8), rank1)
    assert kv.kv_head == 0
    assert_dicts_close(dict(kv.named_parameters()), dict(lin.named_parameters()), "replicated kv init", rtol=0, atol=0)
