"""The `tandem` command end to end on CPU: train at several (tp, pp, dp), generate from the
checkpoint, bench --quick, info, multi-node on loopback, and every bad-argument case."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240


def tandem(*args, timeout=TIMEOUT, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tandem", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def _check_outputs(out, *, pp):
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    losses = [s["loss"] for s in metrics["steps"]]
    assert metrics["final_loss"] < metrics["first_loss"] - 0.3, losses
    assert all(s["tokens_per_s"] > 0 for s in metrics["steps"])
    trace = json.load(open(os.path.join(out, "timeline.json")))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    assert {e["cat"] for e in events if e.get("ph") == "X"} >= {"F", "B"}
    assert len({e["tid"] if pp == 1 else e["pid"] for e in events if e.get("ph") == "X"}) >= 1
    for png in ("schedule.png", "loss.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.exists(os.path.join(out, "checkpoint", ".metadata"))
    return metrics


# tp=2 x pp=2 and pp=2 x dp=2 with --check: test_train_bf16_follows_fp32 and test_train_resume.py
@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 1, 1), (1, 2, 1)])
def test_train(tmp_path, tp, pp, dp):
    out = str(tmp_path / "run")
    r = tandem("train", "--tp", str(tp), "--pp", str(pp), "--dp", str(dp), "--steps", "25", "--out", out,
               "--check")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = _check_outputs(out, pp=pp)
    assert metrics["parallel"] == {**metrics["parallel"], "tp": tp, "pp": pp, "dp": dp}
    assert metrics["check"]["max_loss_diff"] < 2e-3, metrics["check"]
    assert "largest loss difference to the tp=pp=dp=1 reference" in r.stdout


def test_train_bf16_follows_fp32(tmp_path):
    """50 steps at tp=2 x pp=2 in bf16 (fp32 masters, selective recomputation, clipping,
    weight decay) follow the fp32 single-device reference's loss within 0.02."""
    out = str(tmp_path / "run")
    r = tandem("train", "--tp", "2", "--pp", "2", "--precision", "bf16", "--recompute", "selective",
               "--weight-decay", "0.1", "--steps", "50", "--out", out, "--check")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = _check_outputs(out, pp=2)
    training = metrics["training"]
    assert training["precision"] == "bf16" and training["recompute"] == "selective", training
    assert training["optimizer"].startswith("MixedPrecisionOptimizer(AdamW") and training["skipped_steps"] == 0
    memory = training["memory_rank0_bytes"]
    assert memory["masters"] == 2 * memory["parameters"] == memory["gradients"], memory  # fp32 vs bf16
    assert all(s["grad_norm"] > 0 for s in metrics["steps"])
    assert metrics["check"]["max_loss_diff"] < 0.02, metrics["check"]
    assert "(bf16 against fp32)" in r.stdout


def test_generate_from_checkpoint_with_tp_and_pp(tmp_path):
    out = str(tmp_path / "run")
    r = tandem("train", "--tp", "2", "--steps", "120", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    outputs = []
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        g = tandem("generate", "--checkpoint", os.path.join(out, "checkpoint"), "--prompt", "3 7 11",
                   "--max-new-tokens", "6", "--tp", str(tp), "--pp", str(pp))
        assert g.returncode == 0, g.stderr[-3000:]
        tokens = [int(t) for t in g.stdout.split()]
        assert tokens[:3] == [3, 7, 11] and len(tokens) == 9
        outputs.append(tokens)
    assert outputs[0] == outputs[1] == outputs[2]  # greedy: the same tokens at every layout
    assert outputs[0][3:5] == [15, 19]  # it learned the progression


def test_bench_quick_json_plot_and_info(tmp_path):
    r = tandem("bench", "gemm", "--quick", "--json", str(tmp_path / "json"), "--plot", str(tmp_path / "png"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "# " in r.stdout and "fused" in r.stdout
    record = json.load(open(tmp_path / "json" / "gemm.json"))
    assert record["results"] and record["env"]["device"]
    with open(tmp_path / "png" / "gemm.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    r = tandem("info")
    assert r.returncode == 0 and "core" in r.stdout and "advice" in r.stdout


def test_bench_pipeline_quick(tmp_path):
    """`tandem bench pipeline --quick` on 2 gloo ranks: every schedule and m has a row with
    tandem's, the simulator's and torch's figures; the verdicts and the JSON record follow."""
    r = tandem("bench", "pipeline", "--quick", "--json", str(tmp_path / "json"), "--plot", str(tmp_path / "png"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.strip() and not line.startswith("#")]
    assert {(row[0], row[1]) for row in rows} == {(name, m) for name in ("gpipe", "1f1b", "interleaved", "zb-h1")
                                                  for m in ("2", "4")}
    verdicts = [line for line in r.stdout.splitlines() if line.startswith(("# PASS", "# MISS"))]
    assert len(verdicts) == 3, r.stdout
    assert any(line.startswith("# note  bubble vs the replay") for line in r.stdout.splitlines()), r.stdout
    record = json.load(open(tmp_path / "json" / "pipeline.json"))
    for row in record["results"]:
        assert row["tandem_ms"] > 0 and row["sim_ms"] > 0 and 0 < row["bubble"] < 1, row
        assert row["floor_ms"] <= row["sim_ms"] and row["post_us"] > 0, row
        assert 0 < row["replay_bubble"] < 1 and row["latency_us"] > 0, row
        assert (row["torch_ms"] is None) == (row["schedule"] == "zb-h1"), row
    with open(tmp_path / "png" / "pipeline.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback(tmp_path):
    """torchrun --nnodes 2 ... -m tandem train: two 'nodes' of one process each."""
    port = _free_port()
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id", "tandem-test",
           "-m", "tandem", "train", "--tp", "2", "--steps", "5", "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [n.communicate(timeout=TIMEOUT) for n in nodes]
    if any(n.returncode != 0 for n in nodes):
        pytest.fail("\n".join(f"--- node {i}: exit {n.returncode}\n{r[0][-3000:]}\n{r[1][-6000:]}"
                               for i, (n, r) in enumerate(zip(nodes, results))), pytrace=False)
    assert os.path.exists(os.path.join(out, "metrics.json"))


@pytest.mark.parametrize("args,message", [
    (["train", "--tp", "2", "--pp", "2", "--nproc", "3"], "tp*pp*dp = 2*2*1 = 4 does not match the 3 processes"),
    (["train", "--tp", "3"], "not divisible by tp=3"),
    (["train", "--schedule", "2f2b"], "invalid choice: '2f2b'"),
    (["train", "--pp", "4", "--microbatches", "2"], "--schedule 1f1b"),
    (["train", "--model", "{\"hidden_size\": 10}"], "hidden_size=10 is not divisible by num_heads"),
    (["train", "--clip-grad", "-1"], "--clip-grad must be a finite number >= 0, got -1.0"),
    (["train", "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["train", "--recompute", "some"], "invalid choice: 'some'"),
    (["generate", "--checkpoint", "/nonexistent/ckpt", "--prompt", "1 2"], "no checkpoint at '/nonexistent/ckpt'"),
])
def test_bad_arguments_fail_fast_with_exit_code_2(args, message, capsys):
    """In this process: every check runs before any process starts (a traceback would fail
    the test; the end-to-end exit code of `python -m tandem` is test_cli_hf's)."""
    code, err = in_process(args, capsys)
    assert code == 2, (code, err[-2000:])
    assert message in err
    assert len(err.strip().splitlines()) == 1, err  # one clear line


def in_process(args, capsys):
    """(exit code, stderr) of `tandem ARGS` run by tandem.cli.main in this process."""
    from tandem.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _children(pid):
    """Direct child pids of ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _start_long_training(tmp_path):
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tandem", "train", "--tp", "2", "--steps", "100000",
                             "--out", str(tmp_path / "run"), "--timeout", "30"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    workers = []
    while time.monotonic() < deadline and len(workers) < 2:  # tandem -> torch launcher -> 2 workers
        launchers = _children(proc.pid)
        workers = [w for launcher in launchers for w in _children(launcher)]
        time.sleep(0.5)
    assert len(workers) == 2, "the workers did not start"
    log = tmp_path / "run" / "metrics.jsonl"  # a line per step: they reached the training loop
    while time.monotonic() < deadline + 60 and not (log.exists() and log.read_text().count("\n") >= 1):
        time.sleep(0.5)
    assert log.exists(), "no training step was logged"
    return proc, workers


@pytest.mark.parametrize("how", ["dead rank", "ctrl-c"])
def test_a_dead_rank_or_ctrl_c_stops_every_rank(tmp_path, how):
    import signal
    import time

    proc, workers = _start_long_training(tmp_path)
    t0 = time.monotonic()
    if how == "dead rank":
        os.kill(workers[1], signal.SIGKILL)
    else:
        for pid in [proc.pid, *_children(proc.pid)]:  # what a terminal's Ctrl-C does: SIGINT to the group
            os.kill(pid, signal.SIGINT)
    try:
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60
    time.sleep(1)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"]
    assert not alive, f"workers still running: {alive}"


def test_text_timeline_keeps_every_action_visible():
    """make demo's picture: rank 0's F0 (3.8 ms of a 400 ms step, under one cell) is drawn,
    and so is every other action; lines keep their width unless actions outnumber cells."""
    from tandem.cli.outputs import text_timeline
    from tandem.pipeline import TimelineRecord

    def rec(rank, kind, mb, start_ms, end_ms):
        return TimelineRecord(rank, rank, kind, mb, start_ms / 1e3, end_ms / 1e3)

    rows = [rec(0, "F", 0, 0, 3.8), rec(0, "F", 1, 3.8, 80), rec(0, "B", 0, 120, 200), rec(0, "B", 1, 200, 201),
            rec(0, "W", 1, 201, 202), rec(1, "F", 0, 5, 60), rec(1, "B", 0, 60, 119), rec(1, "F", 1, 119, 400)]
    lines = text_timeline(rows, width=72).splitlines()
    rank0, rank1 = (line.split("|")[1] for line in lines[:2])
    assert rank0.startswith("0111") and "abB" in rank0 and len(rank0) == 72, rank0
    assert rank1.startswith("0") and {"0", "a", "1"} <= set(rank1) and len(rank1) == 72, rank1
    many = [rec(0, "F", m, m * 0.1, m * 0.1 + 0.1) for m in range(10)] + [rec(0, "B", 0, 1, 100)]
    line = text_timeline(many, width=20).splitlines()[0].split("|")[1]
    assert line.startswith("0123456789a") and len(line) >= 20, line


def test_the_last_step_starts_at_stage_0s_first_forward():
    """make demo's picture is the last step: it begins with stage 0's F0, not with the send
    of its output (SEND_F0 also ends in "F")."""
    from tandem.cli.outputs import _last_step, text_timeline
    from tandem.pipeline import ActionKind as K
    from tandem.pipeline import TimelineRecord

    rows = []
    for step, t in enumerate((0.0, 1.0)):
        rows += [TimelineRecord(0, 0, K.F, 0, t, t + 0.1), TimelineRecord(0, 0, K.SEND_F, 0, t + 0.1, t + 0.11),
                 TimelineRecord(1, 1, K.RECV_F, 0, t, t + 0.01), TimelineRecord(1, 1, K.F, 0, t + 0.12, t + 0.3),
                 TimelineRecord(1, 1, K.B, 0, t + 0.3, t + 0.5), TimelineRecord(0, 0, K.B, 0, t + 0.5, t + 0.7)]
    last = _last_step(rows)
    assert len(last) == 6 and min(r.start_s for r in last) == 0.0
    assert (0, K.F, 0.0) in {(r.rank, r.kind, r.start_s) for r in last}
    assert text_timeline(last, width=20).splitlines()[0].split("|")[1].startswith("00")
