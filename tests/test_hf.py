"""Hugging Face checkpoints in and out (tandem.hf), against transformers itself.

Small random LlamaForCausalLM, Qwen2ForCausalLM and GPT2LMHeadModel checkpoints, written
with ``save_pretrained`` here, are loaded at tp=1, tp=2, pp=2 and tp=2 x pp=2: the logits
equal transformers' (float64, 1e-10 relative), greedy decoding of 32 new tokens equals
transformers' ``generate`` token for token at every layout, a rank at tp=2 reads at most 60%
of the checkpoint's bytes, and what ``save_model`` writes from each layout loads in
transformers' ``from_pretrained`` with the same logits. Also: the errors of bad checkpoints,
and a tokenizer trained here round-trips text.
"""

import json
import os

import pytest
import torch

from distributed import run_ranks

NEW = 32
LAYOUTS = ("tp2", "pp2", "tp2pp2")


def _hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    none = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    dec = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **none)
    torch.manual_seed(0)
    return {
        "llama": LlamaForCausalLM(LlamaConfig(**dec, rope_parameters=dict(
            rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**dec, tie_word_embeddings=True)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64, **none)),
    }


def _prompt():
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (directory, transformers' logits, transformers' greedy tokens)}."""
    out = {}
    for name, hf in _hf_models().items():
        hf = hf.to(torch.float64).eval()
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path)
        with torch.no_grad():
            logits = hf(_prompt()).logits
            tokens = hf.generate(_prompt(), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
        out[name] = (path, logits, tokens)
    return out


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def test_tp1_logits_generate_and_save_equal_transformers(checkpoints, tmp_path):
    import tandem.hf
    from transformers import AutoModelForCausalLM

    for name, (path, logits, tokens) in checkpoints.items():
        model = tandem.hf.load_model(path)
        assert next(model.parameters()).dtype == torch.float64  # the checkpoint's dtype
        with torch.no_grad():
            _close(model(_prompt()), logits, f"{name} tp=1 logits")
        assert torch.equal(model.generate(_prompt(), NEW), tokens), f"{name} tp=1 decoding"
        assert model.load_report["bytes_read"] == model.load_report["bytes_total"]
        out = str(tmp_path / name)
        tandem.hf.save_model(model, out)
        back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
        assert type(back).__name__ == model.architecture
        with torch.no_grad():
            _close(back(_prompt()).logits, logits, f"{name} saved at tp=1, read by transformers")


def _layout_worker(rank, world, checkpoints, out_dir):
    import tandem
    import tandem.hf
    from tandem.nn import _collectives as C
    from tandem.pipeline import GPipe, PipelineRunner, generate, split

    results = {}
    meshes = {"tp2": dict(tp=2, pp=1, dp=2), "pp2": dict(tp=1, pp=2, dp=2), "tp2pp2": dict(tp=2, pp=2, dp=1)}
    for layout, shape in meshes.items():
        mesh = tandem.init_mesh(**shape)
        for name, (path, logits, tokens) in checkpoints.items():
            what = f"{name} {layout}"
            model = tandem.hf.load_model(path, mesh)
            report = model.load_report
            results[(layout, name, rank)] = report["bytes_read"] / report["bytes_total"]
            target = os.path.join(out_dir, f"{name}-{layout}")
            if mesh.pp == 1:
                with torch.no_grad():
                    full = C.gather_from_tp(model(_prompt()), mesh.tp_comm if mesh.tp > 1 else None, dim=-1)
                _close(full, logits, f"{what} logits")
                assert torch.equal(model.generate(_prompt(), NEW), tokens), f"{what} decoding"
                tandem.hf.save_model(model, target, mesh=mesh)
                continue
            stage = split(model.layers(), mesh.pp, balance=model.partition)
            # layers of other stages were never materialised
            others = [i for i in range(len(model.layers())) if i not in stage.layer_indices]
            assert all(p.is_meta for i in others for p in model.layers()[i].parameters()
                       if not (model.config.tie_embeddings and i == 0 and stage.is_last)), what
            runner = PipelineRunner(stage, mesh=mesh, schedule=GPipe(mesh.pp, 2), loss_fn=lambda y, t: y,
                                    num_microbatches=2, timeout=60)
            out = runner.forward(_prompt() if stage.is_first else None)
            runner.close()
            if stage.is_last:
                _close(C.gather_from_tp(out, mesh.tp_comm if mesh.tp > 1 else None, dim=-1), logits,
                       f"{what} logits")
            got = generate(stage, _prompt(), NEW, mesh=mesh, timeout=60)
            assert torch.equal(got, tokens), f"{what} decoding:\n{got}\n{tokens}"
            tandem.hf.save_model(stage, target, mesh=mesh, config=model.config, architecture=model.architecture)
    return results


def test_every_layout_equals_transformers(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = {k: (v[0], v[1], v[2]) for k, v in checkpoints.items()}
    results = run_ranks(4, _layout_worker, plain, str(tmp_path), timeout=600)
    share = {}
    for r in results:
        share.update(r)
    for name in checkpoints:
        for rank in range(4):
            assert share[("tp2", name, rank)] <= 0.6, (name, rank, share[("tp2", name, rank)])
            assert share[("tp2pp2", name, rank)] <= 0.6, (name, rank)
    for name, (_, logits, _) in checkpoints.items():
        for layout in LAYOUTS:
            back = AutoModelForCausalLM.from_pretrained(str(tmp_path / f"{name}-{layout}"), dtype=torch.float64)
            with torch.no_grad():
                _close(back.eval()(_prompt()).logits, logits, f"{name} saved at {layout}, read by transformers")


# ---- bad checkpoints ----------------------------------------------------------------------------

def _write(path, config: dict, tensors: dict):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if tensors is not None:
        save_file(tensors, os.path.join(path, "model.safetensors"))


def test_bad_checkpoints_are_clear_errors(checkpoints, tmp_path):
    from safetensors.torch import load_file

    import tandem.hf
    from tandem.mesh import Mesh

    path, _, _ = checkpoints["llama"]
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(path, "model.safetensors"))

    _write(str(tmp_path / "bert"), {**config, "architectures": ["BertForMaskedLM"]}, tensors)
    with pytest.raises(ValueError, match="architecture BertForMaskedLM is not supported; supported: "
                                         "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel"):
        tandem.hf.load_model(str(tmp_path / "bert"))

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    _write(str(tmp_path / "missing"), config, missing)
    with pytest.raises(KeyError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        tandem.hf.load_model(str(tmp_path / "missing"))

    _write(str(tmp_path / "shape"), {**config, "intermediate_size": 64}, tensors)
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \(48, 32\), "
                                         r"tandem's blocks.0.mlp.fc1.weight needs \(64, 32\)"):
        tandem.hf.load_model(str(tmp_path / "shape"))

    # sizes tp does not divide: refused before any weight is read (there are none here)
    _write(str(tmp_path / "odd"), {**config, "vocab_size": 63}, None)
    tp2 = Mesh(tp=2, pp=1, dp=1, rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="not divisible by tp=2: vocab_size=63"):
        tandem.hf.load_model(str(tmp_path / "odd"), tp2)

    _write(str(tmp_path / "cut"), config, None)
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        data = f.read()
    with open(str(tmp_path / "cut" / "model.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        tandem.hf.load_model(str(tmp_path / "cut"))

    with pytest.raises(FileNotFoundError, match="no config.json"):
        tandem.hf.load_model(str(tmp_path / "nowhere"))
    _write(str(tmp_path / "noweights"), config, None)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        tandem.hf.load_model(str(tmp_path / "noweights"))


def test_sharded_checkpoint_with_index(checkpoints, tmp_path):
    """A checkpoint cut into several files (model.safetensors.index.json) loads the same."""
    from transformers import AutoModelForCausalLM

    import tandem.hf

    path, logits, _ = checkpoints["qwen2"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    model = tandem.hf.load_model(str(tmp_path))
    with torch.no_grad():
        _close(model(_prompt()), logits, "sharded checkpoint")


# ---- tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_trained_here_round_trips(tmp_path):
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tandem.hf.tokenizer import ByteTokenizer, Tokenizer

    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    fast = Fast(models.BPE(unk_token="<unk>"))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    fast.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = Tokenizer.from_dir(str(tmp_path))
    assert tok.eos_token_ids == [fast.token_to_id("</s>")]
    for prompt in ("tandem scales transformer models", "Ünïcödé — and 3 spaces   here\n", "x"):
        ids = tok.encode(prompt)
        assert tok.decode(ids) == prompt
        stream = tok.stream()
        assert "".join(stream.step(i) for i in ids) == prompt
    assert len(tok.encode("tandem scales transformer models")) < len("tandem scales transformer models")
    byte = ByteTokenizer()
    assert byte.decode(byte.encode("Ünïcödé")) == "Ünïcödé"
    stream = byte.stream()
    assert "".join(stream.step(i) for i in byte.encode("é!")) == "é!"  # the first byte of é waits
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path / "none"))


def test_mistral_and_unsupported_fields(tmp_path):
    """MistralForCausalLM loads (exact within its sliding window) and saves as Mistral; fields
    tandem cannot compute are refused by name."""
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    import tandem.hf

    torch.manual_seed(2)
    hf = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          sliding_window=16)).to(torch.float64).eval()
    hf.save_pretrained(str(tmp_path / "in"))
    model = tandem.hf.load_model(str(tmp_path / "in"))
    assert model.architecture == "MistralForCausalLM" and model.config.max_seq_len == 16  # the window
    with torch.no_grad():
        _close(model(_prompt()), hf(_prompt()).logits, "mistral logits")
    tandem.hf.save_model(model, str(tmp_path / "out"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float64).eval()
    assert type(back).__name__ == "MistralForCausalLM"
    with torch.no_grad():
        _close(back(_prompt()).logits, hf(_prompt()).logits, "mistral saved, read by transformers")
    config = json.loads((tmp_path / "in" / "config.json").read_text())
    for field, value, message in (("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
                                  ("head_dim", 16, "head_dim=16 with 4 heads != hidden_size=32"),
                                  ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                                   "rope_type 'yarn' is not supported")):
        _write(str(tmp_path / field), {**config, field: value}, None)
        with pytest.raises(ValueError, match=message):
            tandem.hf.load_model(str(tmp_path / field))
