"""Several torch.distributed worlds in one benchmark run, taking turns.

A benchmark that compares layouts (tp=1, tp=2, pp=2, ...) needs one gloo world per layout.
`Worlds` starts them all from this process: each rank is a process forked from it (a torch
import per rank would cost seconds; a forked rank has torch already) that rendezvouses with
the other ranks of its world on a file store, builds its state once with
``setup(spec, rank)`` and then waits for commands. ``run(name, command)`` hands a command to
every rank of world ``name`` (``state.run(command)``, collective within that world) and
returns rank 0's result. The other worlds sleep on their inboxes meanwhile, so a benchmark
can interleave its layouts round by round: drift of the machine's load hits them alike.

Forking is safe here because this process does no torch computation before it forks (no
thread pool has started); the ranks run on CPU with gloo. The ranks stay in this process's
session (where the kernel shares a busy machine's CPUs per session, Linux autogroup, the
run competes as one session whatever a layout's rank count). On a busy machine the
scheduler decides how many cores a layout gets: a benchmark should report the cores each
call kept busy, to show what it got. Every wait has a timeout; a rank
that raises makes the next call raise with its traceback, and `close` (or leaving the
``with`` block) stops every rank, killing those that do not exit in time.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import time
import traceback
from typing import Any, Callable

__all__ = ["Worlds", "WorldError"]


class WorldError(RuntimeError):
    """A rank of a world failed, died or did not answer in time; the message says which."""


def _rank_main(name: str, world: int, rank: int, init_file: str, setup: Callable, spec: Any,
               inbox, outbox, timeout: float) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        state = setup(spec, rank)
        outbox.put((name, rank, "ready", getattr(state, "info", None)))
        while True:
            try:
                command = inbox.get(timeout=timeout)
            except queue_mod.Empty:
                raise TimeoutError(f"world {name} rank {rank}: no command within {timeout:g} s") from None
            if command is None:
                dist.barrier()  # no rank leaves while a peer may still talk to it
                break
            result = state.run(command)
            if rank == 0:
                outbox.put((name, rank, "result", result))
    except BaseException:  # every failure goes back to the parent, which raises it
        outbox.put((name, rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Worlds:
    """One gloo world per ``{name: (world size, spec)}``; see the module docstring."""

    def __init__(self, worlds: dict, setup: Callable, *, timeout: float = 300.0):
        if not worlds:
            raise ValueError("Worlds: no world to start")
        for name, (size, _) in worlds.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"Worlds: world {name!r} needs a size >= 1, got {size!r}")
        self.worlds, self.setup, self.timeout = dict(worlds), setup, float(timeout)
        self._ctx = mp.get_context("fork")
        self._outbox = self._ctx.Queue()
        self._procs: dict = {}  # name -> [(process, inbox)] by rank
        self._tmp = None
        self._failed = False  # a rank failed: its peers may wait on it, close kills them at once
        self.info: dict = {}  # name -> rank 0's state.info

    def __enter__(self) -> "Worlds":
        try:
            self.start()
        except BaseException:
            self._failed = True
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the worlds one after another (their set-up does not overlap: memory and
        CPU go to one world at a time), each ready before the next starts."""
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-worlds-")
        for name, (size, spec) in self.worlds.items():
            init_file = os.path.join(self._tmp.name, f"{name}.rendezvous")
            ranks = []
            for rank in range(size):
                inbox = self._ctx.Queue()
                proc = self._ctx.Process(target=_rank_main, daemon=True, name=f"{name}-rank{rank}",
                                         args=(name, size, rank, init_file, self.setup, spec, inbox,
                                               self._outbox, self.timeout))
                proc.start()
                ranks.append((proc, inbox))
            self._procs[name] = ranks
            ready = {}
            while len(ready) < size:
                rank, payload = self._receive(name, "ready")
                ready[rank] = payload
            self.info[name] = ready[0]

    def run(self, name: str, command: Any) -> Any:
        """``state.run(command)`` on every rank of world ``name``; rank 0's result."""
        if name not in self._procs:
            raise ValueError(f"Worlds.run: no world {name!r}; started: {sorted(self._procs)}")
        for _, inbox in self._procs[name]:
            inbox.put(command)
        while True:
            rank, payload = self._receive(name, "result")
            if rank == 0:
                return payload

    def _receive(self, name: str, kind: str):
        """The next ``kind`` message of world ``name``: (rank, payload). Raises WorldError
        on any rank's error, on a rank that died, and after the timeout."""
        try:
            return self._next(name, kind)
        except WorldError:
            self._failed = True
            raise

    def _next(self, name: str, kind: str):
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                world, rank, got, payload = self._outbox.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [f"{w} rank {r} (exit code {p.exitcode})" for w, ranks in self._procs.items()
                        for r, (p, _) in enumerate(ranks) if p.exitcode not in (None, 0)]
                if dead:
                    raise WorldError(f"rank process died: {', '.join(dead)}") from None
                if time.monotonic() > deadline:
                    raise WorldError(f"world {name}: no {kind} within {self.timeout:g} s") from None
                continue
            if got == "error":
                raise WorldError(f"world {world} rank {rank} failed:\n{payload}")
            if world == name and got == kind:
                return rank, payload

    def close(self) -> None:
        """Stop every rank: a clean exit when it can, killed after a grace period (at once
        after a failure, where peers of the failed rank may wait on it)."""
        for ranks in self._procs.values():
            for proc, inbox in ranks:
                if proc.is_alive():
                    inbox.put(None)
        deadline = time.monotonic() + (0.0 if self._failed else 10.0)
        for ranks in self._procs.values():
            for proc, _ in ranks:
                proc.join(timeout=max(0.1, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5.0)
        self._procs = {}
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
