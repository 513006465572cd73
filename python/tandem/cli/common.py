"""What every subcommand shares: one-line errors with exit code 2, and self-launching."""

import os
import subprocess
import sys
from typing import Optional

__all__ = ["UsageError", "fail", "under_launcher", "relaunch", "is_rank0", "finish"]


class UsageError(Exception):
    """Bad arguments: reported as one line, exit code 2, before any work starts."""


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"tandem: error: {message}", file=sys.stderr)
    sys.exit(2)


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def relaunch(nproc: int, argv: list, *, max_restarts: int = 0, env: Optional[dict] = None) -> int:
    """Run ``python -m tandem ARGV`` on ``nproc`` local processes with torch's launcher.

    The launcher watches the workers: when one dies, it stops the others, and with
    ``max_restarts`` > 0 starts them all again (up to that many times). ``env``: more
    environment variables for the workers.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--tee=0", "-m", "tandem", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONUNBUFFERED="1", **(env or {}))
    # restarted workers must not share the launcher's store with the workers they replace:
    # they would read the dead ones' addresses (pytorch/pytorch#135712)
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130


def finish() -> None:
    """End a worker cleanly: wait for every rank, then tear the process groups down, so no
    rank exits while a peer's communication threads still talk to it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
