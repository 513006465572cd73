"""Where a training job resumes from: the checkpoints of a run directory, and every RNG state.

A run keeps its checkpoints in ``RUN/checkpoints/step-00000020`` (the state after 20 steps),
each written atomically by :func:`tandem.checkpoint.save` (``.partial``, then a rename):
a directory named ``step-*`` is complete, a ``step-*.partial`` never is, and
:func:`latest` ignores it. :func:`prune` keeps the newest few.

:func:`rng_state` / :func:`set_rng_state`: this process's torch (CPU and current CUDA
device), NumPy and Python ``random`` generator states as uint8 tensors, the form a
checkpoint stores per rank.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

from tandem import checkpoint

__all__ = ["CHECKPOINTS", "step_dir", "list_steps", "latest", "resolve", "prune", "rng_state", "set_rng_state",
           "rng_keys", "saved_rng", "rng_from_keys"]

CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"^step-(\d+)$")


def step_dir(run_dir: str, step: int) -> str:
    """The checkpoint of ``run_dir`` after ``step`` steps."""
    return os.path.join(run_dir, CHECKPOINTS, f"step-{step:08d}")


def list_steps(run_dir: str) -> list:
    """[(step, path)] of the complete checkpoints of ``run_dir``, oldest first."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP.match(name)
        path = os.path.join(root, name)
        if m and checkpoint.is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint of ``run_dir``, or None."""
    steps = list_steps(run_dir)
    return steps[-1][1] if steps else None


def resolve(target: str, run_dir: str) -> str:
    """The checkpoint that ``--resume [TARGET]`` names: the newest of ``run_dir`` when TARGET
    is "", the newest of TARGET when it is a run directory (it has ``checkpoints/``), else
    TARGET itself. Raises FileNotFoundError naming what is missing or incomplete."""
    if target and not os.path.isdir(os.path.join(target, CHECKPOINTS)):
        checkpoint.read_extra(target)  # refused when missing or incomplete (a .partial is named)
        return target
    where = target or run_dir
    found = latest(where)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in '{os.path.join(where, CHECKPOINTS)}' to resume from")
    return found


def prune(run_dir: str, keep: int) -> list:
    """Delete all but the newest ``keep`` complete checkpoints of ``run_dir`` (and partial
    ones older than the newest complete); returns the deleted paths. ``keep`` <= 0 keeps all."""
    steps = list_steps(run_dir)
    if keep <= 0 or not steps:
        return []
    gone = [path for _, path in steps[:-keep]]
    newest = steps[-1][0]
    root = os.path.join(run_dir, CHECKPOINTS)
    for name in os.listdir(root):
        m = re.match(r"^step-(\d+)\.partial$", name)
        if m and int(m.group(1)) < newest:
            gone.append(os.path.join(root, name))
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def _bytes_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """{"torch", "numpy", "python"[, "cuda"]}: this process's generator states as uint8
    tensors (CUDA: the current device's, when CUDA is initialised)."""
    out = {"torch": torch.get_rng_state(), "numpy": _bytes_tensor(np.random.get_state()),
           "python": _bytes_tensor(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(pickle.loads(state["numpy"].numpy().tobytes()))
    random.setstate(pickle.loads(state["python"].numpy().tobytes()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_keys(rank: int, state: dict) -> dict:
    """``state`` (from :func:`rng_state`) under this rank's checkpoint keys ``rng.<rank>.<what>``."""
    return {f"rng.{rank}.{what}": t for what, t in state.items()}


def saved_rng(path: str, rank: int) -> Optional[dict]:
    """Empty tensors of the sizes that the checkpoint ``path`` holds for ``rank``'s RNG
    states, under their keys (to load in place), or None when it holds none for that rank."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    prefix = f"rng.{rank}."
    out = {k: torch.empty(tuple(m.size), dtype=torch.uint8) for k, m in meta.items() if k.startswith(prefix)}
    return out or None


def rng_from_keys(rank: int, tensors: dict) -> dict:
    """The inverse of :func:`rng_keys`."""
    prefix = f"rng.{rank}."
    return {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
