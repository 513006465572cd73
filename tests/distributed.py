"""Run a function on N ranks of a gloo process group on CPU, for multi-process tests.

Rendezvous is a file store in a fresh temporary directory (no ports, no races). Each rank
runs ``fn(rank, world_size, *args)``; a rank that raises makes ``run_ranks`` raise with
that rank's traceback, and a rank that hangs past ``timeout`` is killed and reported.
"""

import os
import queue as queue_mod
import tempfile
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks", "outcome"]


def _entry(rank, world_size, init_file, fn, args, queue):
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # torch is imported already: the variable alone comes too late
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report everything, including SystemExit from a test helper
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size, fn, *args, timeout=120.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    ``fn`` must be importable (a module-level function). Raises RuntimeError naming the
    failing rank(s) with their tracebacks, or the ranks that did not finish in ``timeout``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, queue), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            try:
                rank, status, payload = queue.get(timeout=max(0.1, min(left, 1.0)))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in results and r not in errors and p.exitcode != 0]
                for r in dead:
                    errors[r] = f"rank {r} died with exit code {procs[r].exitcode}"
                if left <= 0:
                    break
                continue
            (results if status == "ok" else errors)[rank] = payload
            if status != "ok":  # peers of a failed rank may wait on it forever: short grace
                deadline = min(deadline, time.monotonic() + 10.0)
        missing = [r for r in range(world_size) if r not in results and r not in errors]
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors or missing:
        parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
        if missing:
            parts.append(f"ranks {missing} did not finish within {timeout:.0f}s")
        raise RuntimeError("distributed test failed:\n" + "\n".join(parts))
    return [results[r] for r in range(world_size)]


def outcome(call):
    """(exception type name, message, seconds) of a call expected to raise, on a rank: what
    failure tests compare across ranks."""
    t0 = time.monotonic()
    try:
        call()
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return "no error", "", time.monotonic() - t0
