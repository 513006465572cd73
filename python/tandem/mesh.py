"""Mesh: the tp x dp x pp grid of process groups.

Ranks are laid out with TP fastest, then DP, then PP (Megatron's order), so the ranks of a
TP group are contiguous and land on one NVLink domain when a node holds >= tp GPUs:

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["Mesh", "init_mesh", "get_mesh", "set_mesh"]

_default_mesh: Optional["Mesh"] = None
_mesh_serials = itertools.count()  # init_mesh is collective: every rank numbers its meshes alike


@dataclass(eq=False)
class Mesh:
    """The process groups of one rank. Build it with :func:`init_mesh`."""

    tp: int
    pp: int
    dp: int
    rank: int
    device: torch.device
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    timeout: float = 300.0  # seconds: the default timeout of the mesh's communicators
    _comms: dict = field(default_factory=dict, repr=False)
    _serial: Optional[int] = field(default=None, repr=False)  # set by init_mesh
    _counts: dict = field(default_factory=dict, repr=False)
    _aborted: Optional[str] = field(default=None, repr=False)  # why the communicators were aborted

    @classmethod
    def single(cls, device="cpu") -> "Mesh":
        """A one-rank mesh (tp = pp = dp = 1): modules built with it are plain single-device
        modules, even when a default mesh is set."""
        return cls(tp=1, pp=1, dp=1, rank=0, device=torch.device(device))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def global_rank(self, *, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def board_key(self, what: str, *, per_replica: bool = False) -> str:
        """A key in the job's store for the next ``what`` on this mesh (an error board): the
        same on every rank of the mesh (of its dp replica with ``per_replica``), as long as
        they make the same calls on it in one order, and shared with no other mesh, replica
        or call. A mesh not built by init_mesh gets its pp group's name as scope (shared only
        by the ranks of that one pipeline), or a key of its own when it has no groups."""
        n = self._counts[what] = self._counts.get(what, -1) + 1
        scope = self._scope() or f"local-{uuid.uuid4().hex}"
        replica = f"/dp{self.dp_rank}" if per_replica else ""
        return f"tandem/{what}/{scope}{replica}/{n}"

    def _scope(self) -> Optional[str]:
        """The name every rank of the mesh gives it in the job's store (None: groupless)."""
        if self._serial is not None:
            return f"mesh{self._serial}"
        if self.pp_group is not None:
            return f"pp-{self.pp_group.group_name}"
        return None

    def abort(self, reason: str) -> None:
        """Abort the mesh's communicators (local: no peer waits), e.g. after a failed
        pipeline call left operations posted on them, and mark the mesh aborted in the job's
        store, so that the other ranks' next agreement on it (PipelineRunner, generate)
        stops at once instead of waiting for this rank. Using its communicators later
        raises, naming ``reason``."""
        from tandem.comm import abort_all

        first = self._aborted is None
        if first:
            self._aborted = reason
        # with their forks (the StageLinks'): all revoked first, so none waits for another;
        # what else the mesh keeps (generate's ring) is aborted by its own abort()
        abort_all(self._comms.values())
        key, store = self._abort_key(), job_store()
        if first and key is not None and store is not None:
            try:  # the first reason stays; best effort: every rank fails on its own anyway
                store.compare_set(key, "", reason)
            except Exception:  # noqa: BLE001 (an unreachable store changes nothing here)
                pass

    def raise_if_aborted(self) -> None:
        """Raise when this rank aborted the mesh (local, no store read)."""
        if self._aborted is not None:
            raise RuntimeError(f"tandem: the mesh's communicators were aborted after a failure "
                               f"({self._aborted}); build a new mesh with tandem.init_mesh, and the "
                               "modules, stages and loss function on it, to go on")

    def check_aborted(self) -> None:
        """Raise when the mesh was aborted on this rank or, by the job's store, on another
        one (then abort it here too): one store read."""
        key, store = self._abort_key(), job_store()
        if self._aborted is None and key is not None and store is not None:
            try:
                reason = store.get(key).decode() if store.check([key]) else ""
            except Exception:  # noqa: BLE001 (an unreachable store: waits still end at their timeouts)
                reason = ""
            if reason:
                self.abort(f"on another rank: {reason}")
        self.raise_if_aborted()

    def _abort_key(self) -> Optional[str]:
        scope = self._scope()
        return None if scope is None else f"tandem/aborted/{scope}"

    def synchronize(self, timeout: Optional[float] = None) -> None:
        """Block the host until every operation posted on the mesh's communicators (and
        their forks, through their failure domain) so far completed, at most ``timeout``
        seconds each (default the mesh's), and raise if one failed. On CUDA waits only order
        streams; this is the host check before an optimizer steps on what they delivered."""
        for comm in self._comms.values():  # Communicators, and generate's ring
            comm.synchronize(self.timeout if timeout is None else timeout)

    def _comm(self, name: str):
        self.raise_if_aborted()
        if name not in self._comms:
            from tandem.comm import Communicator

            comm = Communicator(getattr(self, f"{name}_group"), self.device, timeout=self.timeout)
            first = next((c for c in self._comms.values() if isinstance(c, Communicator)), None)
            if first is not None:  # one failure domain: a failure of one makes every later use raise
                first.share_failure_domain(comm)
            self._comms[name] = comm
        return self._comms[name]

    @property
    def tp_comm(self):
        """tandem Communicator over the TP group (NCCL on its own streams on GPU, c10d on CPU)."""
        return self._comm("tp")

    @property
    def pp_comm(self):
        return self._comm("pp")

    @property
    def dp_comm(self):
        return self._comm("dp")

    def describe(self) -> str:
        """A printed grid: one block per pipeline stage, rows = dp replicas, columns = tp ranks."""
        lines = [f"Mesh tp={self.tp} pp={self.pp} dp={self.dp} ({self.world_size} ranks, {self.device.type})"]
        for p in range(self.pp):
            lines.append(f"  stage {p}:")
            for d in range(self.dp):
                ranks = [self.global_rank(tp_rank=t, dp_rank=d, pp_rank=p) for t in range(self.tp)]
                cells = " ".join(f"{r:>3}{'*' if r == self.rank else ' '}" for r in ranks)
                lines.append(f"    dp {d}: tp ranks [{cells}]")
        lines.append("  (* = this rank)")
        return "\n".join(lines)


def _new_groups(mesh: Mesh, backend: Optional[str]) -> None:
    """Create every tp, dp and pp group; every rank must create all of them, in one order."""
    tp, dp, pp = mesh.tp, mesh.dp, mesh.pp
    specs = {
        "tp": [[mesh.global_rank(tp_rank=t, dp_rank=d, pp_rank=p) for t in range(tp)]
               for p in range(pp) for d in range(dp)],
        "dp": [[mesh.global_rank(tp_rank=t, dp_rank=d, pp_rank=p) for d in range(dp)]
               for p in range(pp) for t in range(tp)],
        "pp": [[mesh.global_rank(tp_rank=t, dp_rank=d, pp_rank=p) for p in range(pp)]
               for d in range(dp) for t in range(tp)],
    }
    for name, groups in specs.items():
        for ranks in groups:
            group = dist.new_group(ranks, backend=backend)
            if mesh.rank in ranks:
                setattr(mesh, f"{name}_group", group)


def job_store():
    """The job's torch.distributed store, or None (a single process without one)."""
    try:
        from torch.distributed import distributed_c10d as c10d

        return c10d._get_default_store() if dist.is_initialized() else None
    except (RuntimeError, AttributeError, ValueError):
        return None


def init_mesh(tp: int = 1, pp: int = 1, dp: Optional[int] = None, *, backend: Optional[str] = None,
              timeout: float = 300.0) -> Mesh:
    """Build the tp x pp x dp mesh of this rank and make it the default mesh.

    Initialises torch.distributed from the torchrun environment when it is not yet
    initialised (``nccl`` when CUDA is available, else ``gloo``; ``backend`` overrides), and
    as a single process when no launcher set ``WORLD_SIZE``. ``dp`` defaults to
    ``world_size // (tp * pp)``. ``timeout``: seconds, for the process group and as the
    default of the mesh's communicators. Raises ValueError when the world size is not
    tp * pp * dp.
    """
    for name, value in (("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"init_mesh: {name} must be a positive integer, got {value!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"init_mesh: timeout must be a finite number of seconds > 0, got {timeout!r}")
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "WORLD_SIZE" not in os.environ:  # a plain `python script.py`: one rank
            import tempfile

            store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="tandem-"), "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=timeout))
        else:
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    world, rank = dist.get_world_size(), dist.get_rank()
    if dp is None:
        if world % (tp * pp):
            raise ValueError(f"init_mesh: world size {world} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
                             f"launch a multiple of {tp * pp} processes or change tp/pp")
        dp = world // (tp * pp)
    if tp * pp * dp != world:
        raise ValueError(f"init_mesh: world size {world} != tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp}; "
                         f"launch {tp * pp * dp} processes (e.g. torchrun --nproc-per-node {tp * pp * dp}) "
                         f"or change tp/pp/dp")
    used = backend or dist.get_backend()
    if used == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    mesh = Mesh(tp=tp, pp=pp, dp=dp, rank=rank, device=device, timeout=float(timeout),
                _serial=next(_mesh_serials))
    _new_groups(mesh, backend=None)
    set_mesh(mesh)
    return mesh


def get_mesh() -> Optional[Mesh]:
    """The default mesh set by :func:`init_mesh` (None before)."""
    return _default_mesh


def set_mesh(mesh: Optional[Mesh]) -> None:
    global _default_mesh
    _default_mesh = mesh
