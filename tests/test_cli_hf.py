"""`tandem generate --model` (text in, text out) and `tandem train --init-from` on a small
Hugging Face Llama with a tokenizer trained here, against transformers."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tandem(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tandem", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random LlamaForCausalLM (float32) with a byte-level BPE tokenizer trained on the README."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=1, eos_token_id=2))
    model.save_pretrained(str(path))
    return str(path)


def _hf_text(path, prompts, new):
    """transformers' greedy continuation of each prompt, as text (left-padded batch)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = [tok.encode(p).ids for p in prompts]
    n = max(len(i) for i in ids)
    batch = torch.tensor([[2] * (n - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (n - len(i)) + [1] * len(i) for i in ids])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=2)
    texts = []
    for i, p in enumerate(ids):
        new_ids = out[i, n:].tolist()
        new_ids = new_ids[:new_ids.index(2)] if 2 in new_ids else new_ids
        texts.append(tok.decode(p + new_ids, skip_special_tokens=True))
    return texts


def test_generate_text_at_tp2_pp2_equals_transformers(hf_dir):
    prompt = "Pipeline parallelism"
    want = _hf_text(hf_dir, [prompt], 12)[0]
    r = tandem("generate", "--model", hf_dir, "--prompt", prompt, "--max-new-tokens", "12", "--tp", "2", "--pp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith(want.strip()), (r.stdout, want)
    assert r.stdout.count(prompt) == 1


def test_generate_a_batch_of_prompts_and_ids(hf_dir):
    prompts = ["tensor", "The pipeline schedule of 1F1B"]  # different lengths: left padding
    want = _hf_text(hf_dir, prompts, 8)
    r = tandem("generate", "--model", hf_dir, "--prompt", prompts[0], "--prompt", prompts[1],
               "--max-new-tokens", "8", "--tp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[0] {want[0]}\n[1] {want[1]}\n" in r.stdout, (r.stdout, want)
    r = tandem("generate", "--model", hf_dir, "--prompt-ids", "1 40 41", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[:3] == ["1", "40", "41"] and len(r.stdout.split()) <= 7


def test_train_init_from_starts_at_the_models_loss(hf_dir, tmp_path):
    """The first step's loss of `tandem train --init-from` at tp=2 is transformers' loss on the
    same batch: the weights arrived intact."""
    from transformers import AutoModelForCausalLM

    from tandem.cli import data

    out = str(tmp_path / "run")
    r = tandem("train", "--init-from", hf_dir, "--tp", "2", "--steps", "2", "--batch-size", "2", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.load(open(os.path.join(out, "metrics.json")))["steps"][0]["loss"]
    inputs, targets = data.batch(0, 2, 64, 256, seed=0, shard=0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = model(inputs).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert abs(first - want) < 1e-4 * want, (first, want)


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model", "--prompt", "hi"], "no config.json at '/nonexistent/model'"),
    (["--prompt", "hi", "--max-new-tokens", "70"], "exceeds the model's max_seq_len=64"),
    (["--prompt", "hi", "--tp", "3"], "not divisible by tp=3"),
    (["--prompt", "hi", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["--prompt-ids", "1 999"], "prompt token ids must be in [0, 256)"),
    (["--prompt", "a", "--prompt-ids", "1"], "give --prompt or --prompt-ids, not both"),
])
def test_generate_bad_arguments(hf_dir, args, message, capsys):
    """In this process (no process starts for a bad argument)."""
    from test_cli import in_process

    if "--model" not in args:
        args = ["--model", hf_dir, *args]
    code, err = in_process(["generate", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_generate_without_a_tokenizer_is_a_clear_error(hf_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    os.remove(bare / "tokenizer.json")
    r = tandem("generate", "--model", str(bare), "--prompt", "hi", timeout=120)
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr and "--prompt-ids" in r.stderr, r.stderr
    r = tandem("train", "--init-from", str(tmp_path / "none"), timeout=120)
    assert r.returncode == 2 and "--init-from: tandem.hf: no config.json" in r.stderr, r.stderr
