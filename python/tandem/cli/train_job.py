"""The state of a `tandem train` job that outlives its processes: where each step's data
comes from, the learning-rate schedule, and the checkpoints it saves and resumes from.

A checkpoint (``OUT/checkpoints/step-N``, after N steps) holds the model, the optimizer's
state, the step, the LR schedule, the data position (the sampler is a pure function of
(seed, step, dp rank): the step is the position, the rest says which data) and every rank's
RNG states. Resuming at step N then computes exactly what an uninterrupted run computes
from step N on; at another layout (TP/PP sizes) the weights and optimizer states are
resharded and the RNG states (one per rank) are not restored.

Test-only hook: ``TANDEM_TEST_KILL="RANK:STEP"`` makes global rank RANK kill itself with
SIGKILL when step STEP begins, ``"RANK:STEP:save"`` in the middle of writing the checkpoint
after STEP steps (its part written, the checkpoint not yet complete); only in a job's first
attempt (not after a restart). It exists to test restarts; never set it otherwise.
"""

import os
import random
import signal

import numpy as np
import torch

from tandem.cli import common
from tandem.cli.train_options import KILL_ENV, open_data, schedule

__all__ = ["Job", "check_resumable", "restart_count"]

_KIND = "tandem-train"
_FREE = {"recompute"}  # model settings that change no number: a run may resume with others


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (0: the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _data_position(args, cfg, dp: int, train) -> dict:
    """What the sampler needs besides the step: resuming with another value reads other data."""
    pos = {"data": "synthetic" if train is None else "tokens", "num_tokens": None if train is None else len(train),
           "seq_len": cfg.max_seq_len, "samples_per_step": args.batch_size * dp * args.grad_accum,
           "grad_accum": args.grad_accum, "seed": args.seed}
    if train is None:
        pos["dp"] = dp  # the synthetic task draws per dp rank
    return pos


def _show(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else repr(v)


def _differences(saved: dict, mine: dict) -> list:
    return [f"{k} {_show(saved.get(k))} (checkpoint) vs {_show(mine.get(k))}" for k in sorted(set(saved) | set(mine))
            if saved.get(k) != mine.get(k)]


def _optimizer_kind(args) -> dict:
    """What decides the layout of the optimizer's state in a checkpoint: tandem.optim's fp32
    masters (--precision bf16/fp16 or --zero1; any dp loads them) or torch's AdamW."""
    tandem_optim = args.zero1 or args.precision != "fp32"
    return {"state": "tandem.optim (fp32 masters)" if tandem_optim else "torch.optim.AdamW"}


def check_resumable(args, cfg, dp: int, train) -> str:
    """The checkpoint --resume names, checked against this run's model, schedule and data
    (UsageError naming every difference, or an incomplete or missing checkpoint)."""
    from tandem import checkpoint, resume

    try:
        path = resume.resolve(args.resume, args.out)
        extra = checkpoint.read_extra(path)
    except FileNotFoundError as e:
        raise common.UsageError(f"--resume: {e}")
    if extra.get("kind") != _KIND:
        raise common.UsageError(f"--resume: '{path}' is not a training checkpoint of `tandem train` (no optimizer, "
                                "step and data position)")
    mine = {k: v for k, v in cfg.__dict__.items() if k not in _FREE}
    problems = [f"model {d}" for d in _differences({k: v for k, v in extra["config"].items() if k not in _FREE}, mine)]
    problems += [f"learning rate {d}" for d in _differences(extra["schedule"], schedule(args).state_dict())]
    problems += [f"data {d}" for d in _differences(extra["data"], _data_position(args, cfg, dp, train))]
    problems += [f"optimizer {d}" for d in _differences(extra.get("optimizer", {}), _optimizer_kind(args))]
    if problems:
        raise common.UsageError(f"--resume: '{path}' was written by another run: {'; '.join(problems)}")
    return path


def _run_id():
    """The id torchrun gives a job, the same in each of its restarts (None outside torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def _kill_spec():
    spec = os.environ.get(KILL_ENV)
    if not spec or restart_count() > 0:
        return None
    parts = spec.split(":")
    return int(parts[0]), int(parts[1]), len(parts) > 2 and parts[2] == "save"


class Job:
    """Data, LR schedule and checkpoints of one rank of a training run."""

    def __init__(self, args, cfg, mesh, model, params, optimizer):
        from tandem.data import Sampler

        self.args, self.cfg, self.mesh = args, cfg, mesh
        self.model, self.params, self.optimizer = model, params, optimizer
        self.train_data, self.val_data = open_data(args, cfg, check=False)
        self.schedule = schedule(args)
        self.accum = args.grad_accum
        self.sampler = None if self.train_data is None else Sampler(
            num_tokens=len(self.train_data), seq_len=cfg.max_seq_len, batch_size=args.batch_size, dp=mesh.dp,
            accum=self.accum, seed=args.seed)
        self.kill = _kill_spec()
        self.saved_step = None
        # NumPy's and Python's generators too start from (seed, rank), not from the OS: a run
        # is reproducible whatever draws from them (torch's is seeded where the model is built)
        np.random.seed((args.seed * 1_000_003 + mesh.rank) % 2 ** 32)
        random.seed(args.seed * 1_000_003 + mesh.rank)

    # --- data ---------------------------------------------------------------------------------
    def batch(self, step: int, micro: int = 0):
        """(inputs, targets) [batch_size, seq_len] of this dp rank at ``step``, micro-step ``micro``."""
        from tandem.cli import data as synthetic

        args, cfg = self.args, self.cfg
        if self.sampler is None:
            return synthetic.batch(step * self.accum + micro, args.batch_size, cfg.max_seq_len, cfg.vocab_size,
                                   seed=args.seed, shard=self.mesh.dp_rank)
        return self.train_data.batch(self.sampler.starts(step, self.mesh.dp_rank, micro), cfg.max_seq_len)

    def reference_batch(self, step: int, micro: int = 0):
        """Every dp rank's batch of ``step`` concatenated: what the tp=pp=dp=1 reference trains on."""
        from tandem.cli import data as synthetic

        args, cfg, parts = self.args, self.cfg, []
        for r in range(self.mesh.dp):
            if self.sampler is None:
                parts.append(synthetic.batch(step * self.accum + micro, args.batch_size, cfg.max_seq_len,
                                             cfg.vocab_size, seed=args.seed, shard=r))
            else:
                parts.append(self.train_data.batch(self.sampler.starts(step, r, micro), cfg.max_seq_len))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def eval_batches(self) -> list:
        """This dp rank's fixed validation batches: [(inputs, targets)] (--eval-batches of them)."""
        from tandem import data
        from tandem.cli import data as synthetic

        args, cfg, dp, r = self.args, self.cfg, self.mesh.dp, self.mesh.dp_rank
        b, k = args.batch_size, args.eval_batches
        if self.val_data is None:  # the synthetic task: draws no training step makes
            return [synthetic.batch(10 ** 9 + i, b, cfg.max_seq_len, cfg.vocab_size, seed=args.seed, shard=r)
                    for i in range(k)]
        starts = data.eval_starts(len(self.val_data), cfg.max_seq_len, k * b * dp)
        return [self.val_data.batch(starts[(i * dp + r) * b:(i * dp + r + 1) * b], cfg.max_seq_len)
                for i in range(k)]

    # --- checkpoints --------------------------------------------------------------------------
    def _extra(self, step: int) -> dict:
        mesh = self.mesh
        return {"kind": _KIND, "config": dict(self.cfg.__dict__), "step": step, "schedule": self.schedule.state_dict(),
                "data": _data_position(self.args, self.cfg, mesh.dp, self.train_data),
                "layout": {"tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp}, "tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp,
                "tokenizer": (self.train_data.meta or {}).get("tokenizer") if self.train_data is not None else None,
                "run": _run_id(), "optimizer": _optimizer_kind(self.args)}

    def save(self, step: int) -> str:
        """Write the checkpoint after ``step`` steps (collective); prune to --keep."""
        from tandem import checkpoint, resume

        path = resume.step_dir(self.args.out, step)
        state = resume.rng_keys(self.mesh.rank, resume.rng_state())
        checkpoint.save(self.model, path, params=self.params, optimizer=self.optimizer, state=state,
                        extra=self._extra(step), before_commit=lambda: self._maybe_kill(step, in_save=True))
        if self.mesh.rank == 0:
            resume.prune(self.args.out, self.args.keep)
        self.saved_step = step
        return path

    def link_final(self, step: int) -> None:
        """Point ``OUT/checkpoint`` at the checkpoint after the last step (rank 0)."""
        import shutil

        link = os.path.join(self.args.out, "checkpoint")
        if os.path.isdir(link) and not os.path.islink(link):
            shutil.rmtree(link)  # a checkpoint directory of an older version of tandem
        tmp = link + ".tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        from tandem import resume

        os.symlink(os.path.relpath(resume.step_dir(self.args.out, step), self.args.out), tmp)
        os.replace(tmp, link)

    def start(self):
        """(first step, checkpoint resumed from or None): loads the --resume checkpoint, or after
        a restart the newest complete one in --out (a fresh start when there is none)."""
        from tandem import checkpoint, resume

        args, mesh = self.args, self.mesh
        path = self._latest_of_this_job() if restart_count() > 0 else None
        if path is None and args.resume is not None:
            path = resume.resolve(args.resume, args.out)
        if path is None:
            return 0, None
        extra = checkpoint.read_extra(path)
        same_layout = extra.get("layout") == {"tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp}
        rng = resume.saved_rng(path, mesh.rank) if same_layout else None
        checkpoint.load(self.model, path, params=self.params, optimizer=self.optimizer, state=rng)
        if rng is not None:
            resume.set_rng_state(resume.rng_from_keys(mesh.rank, rng))
        self.saved_step = extra["step"]
        return extra["step"], path

    def _latest_of_this_job(self):
        """The newest complete checkpoint in --out that this job wrote (its torchrun run id):
        an earlier job's checkpoints in the same directory are never picked up by a restart."""
        from tandem import checkpoint, resume

        for _, path in reversed(resume.list_steps(self.args.out)):
            if checkpoint.read_extra(path).get("run") == _run_id():
                return path
        return None

    # --- the test-only kill hook ----------------------------------------------------------------
    def before_step(self, step: int) -> float:
        """Set the learning rate of ``step`` (returned); the test hook may kill this rank here."""
        self._maybe_kill(step, in_save=False)
        return self.schedule.apply(self.optimizer, step)

    def _maybe_kill(self, step: int, *, in_save: bool) -> None:
        if self.kill is not None and self.kill == (self.mesh.rank, step, in_save):
            os.kill(os.getpid(), signal.SIGKILL)
