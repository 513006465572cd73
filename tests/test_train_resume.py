"""`tandem train` as a long job, end to end on CPU: real text (prepare-data), validation,
resume that continues bit for bit (tp=2 x pp=2 with --resume and gradient accumulation;
pp=2 x dp=2 with the distributed optimizer and gradient accumulation after a rank is
SIGKILLed and the group restarts; pp=2 in bf16), resume at another layout, a rank killed while a checkpoint is written (never
loaded), the numbers each step reports, and bad data (exit code 2)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = json.dumps(dict(vocab_size=256, max_seq_len=32, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                        ffn_hidden_size=64, norm="rmsnorm", position="rope", activation="swiglu", bias=False))


def _main(*args, capsys):
    """`tandem ARGS` in this process (for commands that fail before starting any process)."""
    from tandem.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """train.bin / val.bin of the repository's README and docs, byte-level."""
    from tandem.cli import main

    out = str(tmp_path_factory.mktemp("text"))
    assert main(["prepare-data", os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs"), "--out", out]) == 0
    return os.path.join(out, "train.bin"), os.path.join(out, "val.bin")


def _train(out, text, *args, env=None, steps=40):
    cmd = [sys.executable, "-m", "tandem", "train", "--model", MODEL, "--data", text[0], "--batch-size", "8",
           "--steps", str(steps), "--out", str(out), "--timeout", "60", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r, json.load(open(os.path.join(out, "metrics.json")))


def _losses(metrics) -> list:
    return [s["loss"] for s in metrics["steps"]]


def _tensors(checkpoint_dir) -> dict:
    """Every tensor of a checkpoint (weights, optimizer states, RNG states), unsharded."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = str(checkpoint_dir) + ".pt"
    dcp_to_torch_save(str(checkpoint_dir), path)
    return torch.load(path, weights_only=False)


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    unequal = [k for k in a if torch.is_tensor(a[k]) and not torch.equal(a[k], b[k])]
    assert not unequal, unequal
    assert any(k.startswith(("optimizer.", "optim.")) for k in a) and any(k.startswith("rng.") for k in a)


def test_resume_tp2_pp2_is_bitwise_and_moves_to_another_layout(tmp_path, text, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    val = ["--val-data", text[1], "--eval-every", "20"]
    accumulate = ["--batch-size", "4", "--grad-accum", "2"]  # 2 passes of 4 sequences per step
    ra, ma = _train(a, text, "--tp", "2", "--pp", "2", *accumulate, "--save-every", "20", *val, "--check")
    assert ma["check"]["max_loss_diff"] < 1e-5  # the same steps in one process, 8 sequences at once
    # what each step reports (CPU: no MFU without --peak-tflops), log lines for a pipe, validation
    for s in ma["steps"]:
        assert s["lr"] > 0 and s["tokens_per_s"] > 0 and s["tflops_per_device"] > 0 and s["memory_peak_bytes"] > 0
        assert s["grad_norm"] > 0 and s["stepped"] and "mfu" not in s  # clipping (1.0) measures the norm
    assert [s["step"] for s in ma["steps"]] == list(range(40))
    assert ma["steps"][0]["lr"] == 3e-3 and ma["steps"][-1]["lr"] == pytest.approx(3e-4)  # cosine to lr/10
    assert [e["step"] for e in ma["eval"]] == [19, 39] and ma["eval"][1]["val_loss"] < ma["steps"][0]["loss"] - 1
    assert ma["unigram_entropy"] > 2 and "step 11/40 | loss" in ra.stdout and "\r" not in ra.stdout
    assert "| grad-norm " in ra.stdout
    assert f"validation loss {ma['eval'][1]['val_loss']:.4f} vs unigram entropy" in ra.stdout
    mem = ma["memory"]["ranks"]
    assert len(mem) == 4 and all(m["params"] > 0 and m["grads"] == m["params"] and m["optimizer"] >= 2 * m["params"]
                                 and m["activations"] > 0 for m in mem)
    assert len(open(a / "metrics.jsonl").read().splitlines()) == 42  # 40 steps, 2 evaluations

    # 20 steps, a new process, --resume, 20 more: every loss and every tensor bitwise equal
    rb, mb = _train(b, text, "--tp", "2", "--pp", "2", *accumulate, "--save-every", "20", *val,
                    "--resume", str(a / "checkpoints" / "step-00000020"))
    assert "resumed from" in rb.stdout and mb["resumes"][0]["step"] == 20
    assert _losses(mb) == _losses(ma) and mb["eval"] == ma["eval"]
    _assert_bitwise_equal(_tensors(a / "checkpoint"), _tensors(b / "checkpoint"))

    # another layout (tp=1 x pp=2) from the same step: the loss curve within 1e-6; a rank dies
    # while the checkpoint of step 30 is written: the restarted job resumes at 25, never at 30
    _, mc = _train(c, text, "--pp", "2", *accumulate, "--save-every", "5", "--max-restarts", "1",
                   "--resume", str(a / "checkpoints" / "step-00000020"), env={"TANDEM_TEST_KILL": "1:30:save"})
    assert [(r["step"], r["restart"]) for r in mc["resumes"]] == [(20, 0), (25, 1)]
    assert max(abs(x - y) for x, y in zip(_losses(mc)[20:], _losses(ma)[20:])) <= 1e-6
    assert [s["step"] for s in mc["steps"]] == list(range(40))

    # the checkpoint knows its tokenizer (bytes): generate takes and writes text
    g = subprocess.run([sys.executable, "-m", "tandem", "generate", "--checkpoint", str(a / "checkpoint"), "--prompt",
                        "The ", "--max-new-tokens", "12"], cwd=ROOT, capture_output=True, text=True, timeout=200,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert g.returncode == 0 and g.stdout.startswith("The ") and len(g.stdout.rstrip("\n")) > 4, g.stderr[-2000:]

    # a checkpoint of another run is refused, naming what differs; so is an incomplete one
    common = ["train", "--model", MODEL, "--data", text[0], "--steps", "40", "--out", str(b), *accumulate]
    cases = [
        (["--resume", str(a), "--model", MODEL.replace('"hidden_size": 32', '"hidden_size": 64')],
         "was written by another run: model hidden_size 32 (checkpoint) vs 64"),
        (["--resume", str(a), "--lr", "1e-3"], "learning rate lr 0.003 (checkpoint) vs 0.001"),
        (["--resume", str(a), "--batch-size", "2"], "data samples_per_step 8 (checkpoint) vs 4"),
        (["--resume", str(a), "--precision", "bf16", "--grad-accum", "1", "--batch-size", "8"],
         "optimizer state 'torch.optim.AdamW' (checkpoint) vs 'tandem.optim (fp32 masters)'"),
        (["--resume", str(c / "checkpoints" / "step-00000030.partial")], "is not a complete tandem checkpoint"),
        (["--resume", str(tmp_path / "nothing")], "no checkpoint at"),
    ]
    os.makedirs(c / "checkpoints" / "step-00000030.partial", exist_ok=True)
    for extra, message in cases:
        code, _, err = _main(*common, *extra, capsys=capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_killed_rank_restarts_and_continues_bitwise_pp2_dp2(tmp_path, text):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the distributed optimizer (its state sharded over dp in the checkpoints) with gradient
    # accumulation: 2 passes of 4 sequences per dp rank, reduced over dp once per step
    zero1 = ["--zero1", "--batch-size", "4", "--grad-accum", "2"]
    _, ms = _train(straight, text, "--pp", "2", "--dp", "2", *zero1, "--check")
    assert ms["check"]["max_loss_diff"] < 1e-5  # the same steps on one process, 16 sequences at once
    r, mk = _train(killed, text, "--pp", "2", "--dp", "2", *zero1, "--save-every", "10", "--max-restarts", "1",
                   env={"TANDEM_TEST_KILL": "1:25"})
    assert [(x["step"], x["restart"]) for x in mk["resumes"]] == [(20, 1)]  # restarted once, at step 20
    assert "resumed from" in r.stdout and "(restart 1)" in r.stdout
    assert [s["step"] for s in mk["steps"]] == list(range(40))
    assert _losses(mk) == _losses(ms)  # steps 20-39 computed after the restart
    _assert_bitwise_equal(_tensors(straight / "checkpoint"), _tensors(killed / "checkpoint"))


def test_bf16_resume_is_bitwise_pp2(tmp_path, text):
    """bf16 parameters with fp32 masters (MixedPrecisionOptimizer): 10 steps straight equal
    5 steps, a new process, --resume, 5 more; losses and every tensor (bf16 weights, fp32
    masters and moments, RNG states) bitwise."""
    a, b = tmp_path / "a", tmp_path / "b"
    bf16 = ["--pp", "2", "--precision", "bf16", "--save-every", "5"]
    _, ma = _train(a, text, *bf16, steps=10)
    assert all(s["stepped"] for s in ma["steps"])
    _, mb = _train(b, text, *bf16, "--resume", str(a / "checkpoints" / "step-00000005"), steps=10)
    assert mb["resumes"][0]["step"] == 5 and _losses(mb) == _losses(ma)
    ta, tb = _tensors(a / "checkpoint"), _tensors(b / "checkpoint")
    assert any(v.dtype == torch.bfloat16 for v in ta.values() if torch.is_tensor(v))
    _assert_bitwise_equal(ta, tb)


def test_bad_data_is_one_line_and_exit_code_2(tmp_path, text, capsys):
    import numpy as np

    from tandem import data

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    big = tmp_path / "big.bin"
    ids = np.zeros(100, dtype=np.uint16)
    ids[41] = 999
    ids.tofile(big)
    short = tmp_path / "short.bin"
    np.arange(20, dtype=np.uint16).tofile(short)
    data.write_meta(str(short), dtype="uint16", num_tokens=20, max_id=19, vocab_size=256, tokenizer="bytes")
    base = ["train", "--model", MODEL, "--out", str(tmp_path / "run")]
    cases = [
        (["--data", str(tmp_path / "missing.bin")], "--data '", "missing.bin': no such file"),
        (["--data", str(empty)], "empty.bin", "the file is empty"),
        (["--data", str(big)], "big.bin", "token id 999 at offset 41 is >= the model's vocab_size 256"),
        (["--data", str(short)], "short.bin", "20 tokens, shorter than one sequence (seq_len + 1 = 33 tokens)"),
        (["--data", text[0], "--data-dtype", "uint32"], "train.bin", "holds uint16 tokens (its side file"),
        (["--data", text[0], "--eval-every", "10"], "--eval-every", "needs validation data"),
        (["--data", text[0], "--val-data", str(short), "--eval-every", "5"], "short.bin", "shorter than one sequence"),
        (["--data", text[0], "--val-fraction", "2"], "--val-fraction", "must be in (0, 1)"),
        (["--val-data", text[1]], "--val-data", "need a token file as --data"),
        (["--data", text[0], "--warmup-steps", "500"], "learning rate", "warmup_steps must be in [0, total_steps"),
    ]
    for extra, where, message in cases:
        code, _, err = _main(*base, *extra, capsys=capsys)
        assert code == 2, (extra, err)
        assert where in err and message in err and len(err.strip().splitlines()) == 1, err
