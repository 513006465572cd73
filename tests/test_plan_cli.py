"""`tandem plan` end to end (in process): the ranked answer, --json, --layout, --explain,
--plot, and bad arguments as one line with exit code 2."""

import json

import pytest

from tandem.cli import main


def run(capsys, *args):
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_prints_a_ranked_answer_with_reasons_and_the_command(capsys):
    code, out, _ = run(capsys, "--model", "megatron-1.7b", "--gpus", "32", "--global-batch", "512", "--gpu",
                       "A100-80GB", "--top", "3")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("megatron-1.7b (1.7B parameters) on 32 x A100-80GB")
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("#  tp"))
    assert [line.split()[0] for line in lines[header + 1:header + 4]] == ["1", "2", "3"]
    assert "why #1:" in out and "NVLink" in out or "tp=1:" in out
    assert "run it:" in out and "-m tandem train --tp" in out and "torchrun --nnodes 4 --nproc-per-node 8" in out


def test_plan_json(capsys):
    code, out, _ = run(capsys, "--model", "llama3-8b", "--gpus", "16", "--global-batch", "64", "--seq-len", "4096",
                       "--gpu", "H200", "--json", "--top", "2")
    assert code == 0
    data = json.loads(out)
    assert data["gpus"] == 16 and len(data["ranked"]) == 2 and data["ranked"][0]["fits"]
    best = data["ranked"][0]
    assert best["time_s"]["step"] >= best["time_s"]["compute"] > 0
    assert any("--init-from" in n for n in data["command_notes"])  # a Llama preset: its GPTConfig or HF directory


def test_one_layout_breakdown_and_plots(capsys, tmp_path):
    code, out, _ = run(capsys, "--model", "megatron-145b", "--gpu", "A100-80GB", "--global-batch", "2304",
                       "--framework", "megatron-sc21", "--layout",
                       "tp=8,pp=8,dp=24,mb=2,schedule=interleaved:v=2,recompute=full", "--plot", str(tmp_path))
    assert code == 0
    for what in ("memory per GPU", "exposed TP communication", "pipeline bubble", "exposed DP communication",
                 "TFLOP/s per GPU", "fits"):
        assert what in out
    for png in ("memory.png", "schedule.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain(capsys):
    code, out, _ = run(capsys, "--model", "megatron-145b", "--gpu", "A100-80GB", "--global-batch", "2304",
                       "--explain", "tp=8,pp=1,dp=192,mb=1")
    assert code == 0 and "dropped" in out and "needs" in out and "weights" in out


@pytest.mark.parametrize("args,message", [
    (["--gpus", "8", "--global-batch", "8"], "--model is required"),
    (["--model", "nope", "--gpus", "8", "--global-batch", "8"], "not a preset"),
    (["--model", "megatron-1.7b", "--gpus", "0", "--global-batch", "8"], "--gpus must be >= 1"),
    (["--model", "megatron-1.7b", "--gpus", "8"], "--global-batch is required"),
    (["--model", "megatron-1.7b", "--gpus", "8", "--global-batch", "8", "--gpu", "TPU"], "not a built-in profile"),
    (["--model", "megatron-1.7b", "--global-batch", "8", "--layout", "tp=2,pp=2", "--gpus", "8"],
     "uses tp*pp*dp = 4 GPUs"),
    (["--model", "megatron-1.7b", "--global-batch", "2", "--layout", "tp=2,pp=4,dp=1"], "microbatches < pp=4"),
    (["--model", "megatron-1t", "--gpus", "8", "--global-batch", "8", "--gpu", "A100-80GB"],
     "no layout of megatron-1t on 8 x A100-80GB runs and fits"),
])
def test_bad_arguments_are_one_line_and_exit_code_2(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["plan", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert message in err and err.startswith("tandem: error:") and err.count("\n") == 1
