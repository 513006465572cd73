"""The discrete-event engine under ``simulate`` and ``lower``: per-stage ``Costs`` and
``_execute``, which runs action lists as a dataflow (the semantics are ``simulate``'s
docstring). Its own module so that ``lower`` (which times compute-only lists to place the
receives) and ``simulate`` (which lowers first) depend on it and not on each other."""

from __future__ import annotations

import contextlib
import gc
import heapq
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from tandem.pipeline.ir import Action, ActionKind, DeadlockError, StageLayout, TimelineRecord

__all__ = ["Costs", "CostsLike"]

K = ActionKind


@dataclass(frozen=True, kw_only=True)
class Costs:
    """Durations of the actions of one stage (any unit; seconds for measured costs)."""

    F: float = 1.0
    """forward"""
    B: float = 1.0
    """input gradient when the backward is split; a full backward costs B + W"""
    W: float = 1.0
    """weight gradient"""
    comm: float = 0.0
    """from the start of a send until the data is at the receiver"""
    post_send: float = 0.0
    """host time a SEND holds its rank (posting the message; the transfer is ``comm``)"""
    post_recv: float = 0.0
    """host time a RECV holds its rank (posting the receive)"""

    def __post_init__(self):
        for name in ("F", "B", "W"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"Costs.{name} must be a finite number > 0, got {value!r}")
        for name in ("comm", "post_send", "post_recv"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Costs.{name} must be a finite number >= 0, got {value!r}")

    def of(self, kind: ActionKind, split: bool) -> float:
        if kind is K.F:
            return self.F
        if kind is K.B:
            return self.B if split else self.B + self.W
        return self.W


CostsLike = Costs | Mapping[int, Costs] | None


def _stage_costs(costs: CostsLike, stage: int) -> Costs:
    if costs is None:
        return Costs()
    if isinstance(costs, Costs):
        return costs
    if stage not in costs:
        raise ValueError(f"costs has no entry for stage {stage}")
    return costs[stage]


# What an action waits on: (table, key, delay, description). Tables: "done" (end time of a
# compute action, keyed (kind, stage, mb)), "posted" (post time of a receive, keyed like
# the receive) and "landed" (arrival time of a message, keyed like its receive).
def _deps(a: Action, layout: StageLayout, explicit: bool, delay: float) -> list[tuple]:
    s, mb, kind = a.stage, a.microbatch, a.kind
    ranks = layout.ranks
    if kind is K.F or kind is K.B:
        src = s - 1 if kind is K.F else s + 1
        deps = [] if kind is K.F else [("done", (K.F, s, mb), 0.0)]
        if 0 <= src < len(ranks):  # the data from the neighbouring stage
            if ranks[src] == ranks[s]:
                deps.append(("done", (kind, src, mb), 0.0))
            elif explicit:
                deps.append(("landed", (K.RECV_F if kind is K.F else K.RECV_B, s, mb), 0.0))
            else:
                deps.append(("done", (kind, src, mb), delay))
        return deps
    if kind is K.W:
        return [("done", (K.B, s, mb), 0.0)]
    if kind is K.SEND_F:
        return [("done", (K.F, s, mb), 0.0), ("posted", (K.RECV_F, s + 1, mb), 0.0)]
    if kind is K.SEND_B:
        return [("done", (K.B, s, mb), 0.0), ("posted", (K.RECV_B, s - 1, mb), 0.0)]
    return []  # RECV_F / RECV_B: posting never waits


def _describe(table: str, key: tuple, where: dict) -> str:
    action = Action(key[1], key[0], key[2])
    found = where.get(action)
    at = f"rank {found[0]} step {found[1]}" if found else "in no list"
    if table == "done":
        return f"{action} ({at})"
    if table == "posted":
        return f"{action} to be posted ({at})"
    send = (Action(key[1] - 1, K.SEND_F, key[2]) if key[0] is K.RECV_F
            else Action(key[1] + 1, K.SEND_B, key[2]))
    found = where.get(send)
    at = f"rank {found[0]} step {found[1]}" if found else "in no list"
    return f"the data of {action}, sent by {send} ({at})"


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _execute(lists: Mapping[int, Sequence[Action]], layout: StageLayout, costs: CostsLike,
             split: bool, *, explicit_comm: bool,
             durations: Mapping[Action, float] | None = None) -> list[TimelineRecord]:
    """Run the lists as a dataflow; compute-only lists when ``explicit_comm`` is False
    (remote data lands ``comm`` after its producer ends), lowered lists otherwise.
    ``durations`` overrides the costs of single actions.

    The order of the records is that of sweeps over the ranks in increasing order, each
    rank running as far as it can. A rank that waits is visited again only once what it
    waits for exists: in the same sweep when a lower rank produced it, else in the next."""
    durations = durations or {}
    tables: dict[str, dict[tuple, float]] = {"done": {}, "posted": {}, "landed": {}}
    ranks = sorted(lists)
    pc = {r: 0 for r in ranks}
    clock = {r: 0.0 for r in ranks}
    waiters: dict[tuple, list[int]] = {}  # (table, key) -> ranks waiting for it
    records: list[TimelineRecord] = []
    pending = sum(len(lists[r]) for r in ranks)
    sweep, later = list(ranks), set()  # ranks to visit in this sweep (a heap), in the next

    def produced(table: str, key: tuple, value: float, by: int) -> None:
        tables[table][key] = value
        for w in waiters.pop((table, key), ()):
            if w > by:
                heapq.heappush(sweep, w)
            else:
                later.add(w)

    while pending:
        if not sweep:
            if not later:
                raise _deadlock(lists, layout, tables, pc, clock, explicit_comm)
            sweep, later = sorted(later), set()
        r = heapq.heappop(sweep)
        while sweep and sweep[0] == r:  # woken twice in one sweep
            heapq.heappop(sweep)
        lst = lists[r]
        while pc[r] < len(lst):
            a = lst[pc[r]]
            c = _stage_costs(costs, a.stage)
            deps = _deps(a, layout, explicit_comm, c.comm)
            missing = next(((t, k) for t, k, _ in deps if k not in tables[t]), None)
            if missing is not None:
                waiters.setdefault(missing, []).append(r)
                break
            start = max([clock[r]] + [tables[t][k] + d for t, k, d in deps])
            key = (a.kind, a.stage, a.microbatch)
            own = durations.get(a) if durations else None
            if a.kind.is_compute:
                end = clock[r] = start + (c.of(a.kind, split) if own is None else own)
                produced("done", key, end, r)
            elif a.kind in (K.RECV_F, K.RECV_B):  # posted once its host work is done
                end = clock[r] = start + (c.post_recv if own is None else own)
                produced("posted", key, end, r)
            else:  # a send: the rank is free once posted, the data lands after comm
                post = c.post_send if own is None else own
                end = start + max(c.comm, post)
                clock[r] = start + post
                target = ((K.RECV_F, a.stage + 1, a.microbatch) if a.kind is K.SEND_F
                          else (K.RECV_B, a.stage - 1, a.microbatch))
                produced("landed", target, end, r)
            records.append(TimelineRecord(r, a.stage, a.kind, a.microbatch, start, end))
            pc[r] += 1
            pending -= 1
    return records


def _deadlock(lists, layout, tables, pc, clock, explicit) -> DeadlockError:
    where = {a: (r, i) for r, lst in lists.items() for i, a in enumerate(lst)}
    blocked = {}
    for r, lst in lists.items():
        if pc[r] < len(lst):
            a = lst[pc[r]]
            missing = [_describe(t, k, where) for t, k, _ in _deps(a, layout, explicit, 0.0)
                       if k not in tables[t]]
            blocked[r] = (pc[r], a, " and ".join(missing))
    return DeadlockError(blocked, max(clock.values()))
