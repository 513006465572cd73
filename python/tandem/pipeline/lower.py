"""Lowering: check compute action lists and insert matched sends and receives.

Where each message goes (see ``simulate`` for the semantics):

- ``SEND`` right after the action that produced the data (F for SEND_F, B for SEND_B).
- ``RECV`` posted on the consumer's rank at the last point before the producer *starts*
  (in a dry run of the compute lists with the given costs, posting free), so the receive
  is waiting before the data exists and the send never blocks under those costs.

This gives one global order of all actions (by dry-run time, receives before sends before
computes) that every rank's list follows and in which each action waits only on earlier
ones: the lowered lists cannot deadlock, whatever the real durations. Between two ranks,
messages are posted in the same order on both ends (FIFO per direction, as NCCL matches
them), and stages on the same rank hand data over locally, without messages.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Mapping, NamedTuple, Sequence

from tandem.pipeline.ir import Action, ActionKind, ScheduleError, StageLayout
from tandem.pipeline.schedules import Schedule
from tandem.pipeline.events import CostsLike, _execute

__all__ = ["lower", "validate_lowered"]

K = ActionKind


class _Summary(NamedTuple):
    layout: StageLayout
    num_microbatches: int
    split_backward: bool


def _as_lists(actions) -> dict[int, list[Action]]:
    if not isinstance(actions, Mapping):
        raise TypeError(f"expected a Schedule or {{rank: [Action]}}, got {type(actions).__name__}")
    ranks = sorted(actions)
    if ranks != list(range(len(ranks))) or not ranks:
        raise ScheduleError(f"ranks must be 0..R-1, got {ranks}")
    out = {}
    for r in ranks:
        lst = list(actions[r])
        for i, a in enumerate(lst):
            if not isinstance(a, Action):
                raise ScheduleError(f"rank {r} step {i}: expected an Action, got {a!r}")
        out[r] = lst
    return out


def _check_compute(actions: Mapping[int, Sequence[Action]],
                   layout: StageLayout | None = None) -> _Summary:
    """Check the F/B/W of action lists (sends and receives are ignored here)."""
    lists = _as_lists(actions)
    inferred = StageLayout.infer(lists)
    if layout is not None and layout != inferred:
        raise ScheduleError(f"the lists place stages on ranks {list(inferred.ranks)}, "
                            f"but the layout says {list(layout.ranks)}")
    layout = inferred
    if layout.num_ranks != len(lists):
        idle = list(range(layout.num_ranks, len(lists)))
        raise ScheduleError(f"ranks {idle} hold no action; every rank must hold a stage")
    pos: dict[Action, tuple[int, int]] = {}
    for r, lst in lists.items():
        for i, a in enumerate(lst):
            if a in pos:
                raise ScheduleError(f"{a} appears twice: rank {pos[a][0]} step {pos[a][1]} "
                                    f"and rank {r} step {i}")
            pos[a] = (r, i)
    step = {(a.stage, a.kind, a.microbatch): ri[1] for a, ri in pos.items() if a.kind.is_compute}
    if not step:
        raise ScheduleError("the lists hold no F, B or W action")
    m = max(key[2] for key in step) + 1
    split = any(key[1] is K.W for key in step)
    kinds = (K.F, K.B, K.W) if split else (K.F, K.B)
    for s in range(layout.num_stages):
        for mb in range(m):
            for kind in kinds:
                if (s, kind, mb) not in step:
                    why = (" (the lists have W elsewhere: split every backward into B and W, "
                           "or none)" if kind is K.W else "")
                    raise ScheduleError(f"{Action(s, kind, mb)} is missing: every stage runs "
                                        f"{'/'.join(k.value for k in kinds)} for microbatches "
                                        f"0..{m - 1}{why}")
    # order on one rank: F before B before W; local hand-overs between stages in order
    ranks = layout.ranks
    for (stage, kind, mb), i in step.items():
        r = ranks[stage]
        before = []
        if kind is K.B:
            before.append((stage, K.F, mb))
            if stage + 1 < len(ranks) and ranks[stage + 1] == r:
                before.append((stage + 1, K.B, mb))
        elif kind is K.W:
            before.append((stage, K.B, mb))
        elif kind is K.F and stage > 0 and ranks[stage - 1] == r:
            before.append((stage - 1, K.F, mb))
        for dep in before:
            if step[dep] > i:
                raise ScheduleError(f"rank {r} step {i}: {Action(stage, kind, mb)} comes before "
                                    f"{Action(*dep)} (step {step[dep]}), which it needs")
    return _Summary(layout, m, split)


def _message(a: Action, layout: StageLayout) -> tuple[Action, Action] | None:
    """(send, receive) carrying the output of compute action ``a`` to another rank."""
    ranks, s, mb = layout.ranks, a.stage, a.microbatch
    if a.kind is K.F and s + 1 < len(ranks):
        if ranks[s + 1] == ranks[s]:
            return None
        return Action._unchecked(s, K.SEND_F, mb), Action._unchecked(s + 1, K.RECV_F, mb)
    if a.kind is K.B and s > 0:
        if ranks[s - 1] == ranks[s]:
            return None
        return Action._unchecked(s, K.SEND_B, mb), Action._unchecked(s - 1, K.RECV_B, mb)
    return None


def validate_lowered(lists: Mapping[int, Sequence[Action]]) -> _Summary:
    """Check lowered lists; return ``(layout, num_microbatches, split_backward)``.

    Beyond the compute checks: every message between ranks has exactly one send (after its
    producer) and one receive (before its consumer), and between two ranks the messages are
    in the same order on both ends. Raises ``ScheduleError`` saying where.
    """
    lists = _as_lists(lists)
    summary = _check_compute(lists)
    layout = summary.layout
    pos = {a: (r, i) for r, lst in lists.items() for i, a in enumerate(lst)}
    expected = {}
    for a in pos:
        if a.kind.is_compute and (msg := _message(a, layout)) is not None:
            send, recv = msg
            consumer = Action(recv.stage, K.F if recv.kind is K.RECV_F else K.B, a.microbatch)
            expected[send] = (a, "after", "its data comes from")
            expected[recv] = (consumer, "before", "it feeds")
    for a, (r, i) in pos.items():
        if a.kind.is_compute:
            continue
        if a not in expected:
            raise ScheduleError(f"rank {r} step {i}: {a} matches no message between ranks "
                                "(stages on the same rank, or the first/last stage, need none)")
        anchor, side, what = expected[a]
        j = pos[anchor][1]
        if (side == "after") != (i > j):
            raise ScheduleError(f"rank {r} step {i}: {a} must come {side} {anchor} (step {j}), "
                                f"which {what}")
    absent = [str(a) for a in expected if a not in pos]
    if absent:
        raise ScheduleError(f"messages between ranks lack {', '.join(absent[:8])}"
                            f"{' ...' if len(absent) > 8 else ''}: lower() inserts them")
    _check_fifo(lists, layout)
    return summary


def _check_fifo(lists: dict[int, list[Action]], layout: StageLayout) -> None:
    sent, received = defaultdict(list), defaultdict(list)
    for r, lst in lists.items():
        for a in lst:
            if a.kind in (K.SEND_F, K.SEND_B):
                sent[r, layout.peer(a)].append(_message_id(a))
            elif a.kind in (K.RECV_F, K.RECV_B):
                received[layout.peer(a), r].append(_message_id(a))
    for (src, dst), order in sent.items():
        other = received[src, dst]
        if order != other:
            k = next(i for i, (x, y) in enumerate(zip(order, other)) if x != y)
            raise ScheduleError(
                f"messages from rank {src} to rank {dst} are out of order: message {k} is "
                f"{order[k][0]} on rank {src} but {other[k][1]} on rank {dst}; both ends "
                "must send and receive in the same order")


def _message_id(a: Action) -> tuple[Action, Action]:
    if a.kind is K.SEND_F:
        return a, Action(a.stage + 1, K.RECV_F, a.microbatch)
    if a.kind is K.SEND_B:
        return a, Action(a.stage - 1, K.RECV_B, a.microbatch)
    if a.kind is K.RECV_F:
        return Action(a.stage - 1, K.SEND_F, a.microbatch), a
    return Action(a.stage + 1, K.SEND_B, a.microbatch), a


def lower(schedule, costs: CostsLike = None) -> dict[int, list[Action]]:
    """Return ``{rank: [Action]}`` with sends and receives inserted (see the module doc).

    ``schedule``: a ``Schedule`` or compute-only lists ``{rank: [Action]}``. Lists that
    already hold sends and receives (hand-written) are validated and returned as they are.
    ``costs`` (as for ``simulate``) decides where receives are posted. Raises
    ``DeadlockError`` when the compute order itself cannot run, ``ScheduleError`` for
    malformed lists.
    """
    return _lower(schedule, costs)[0]


def _lower(schedule, costs: CostsLike) -> tuple[dict[int, list[Action]], _Summary]:
    """``lower`` and the summary of the lists it checked (valid lowered lists either way)."""
    if isinstance(schedule, Schedule):
        given = schedule._lowered_as_written()
        lists = given if given is not None else schedule.compute_actions()
    else:
        lists = _as_lists(schedule)
    if any(not a.kind.is_compute for lst in lists.values() for a in lst):
        summary = validate_lowered(lists)
        return {r: list(lst) for r, lst in lists.items()}, summary
    summary = _check_compute(lists)
    layout, _, split = summary
    records = _execute(lists, layout, costs, split, explicit_comm=False)
    start = {rec.action: rec.start_s for rec in records}
    ends = {r: [] for r in lists}  # end times of each rank's computes, in list order
    for rec in records:
        ends[rec.rank].append(rec.end_s)
    sends = defaultdict(list)  # (rank, step) -> sends right after that step
    posts = defaultdict(list)  # (rank, slot) -> receives posted before compute `slot`
    for r, lst in lists.items():
        for i, a in enumerate(lst):
            if (msg := _message(a, layout)) is not None:
                send, recv = msg
                sends[r, i].append(send)
                dst = layout.rank_of(recv.stage)
                slot = bisect.bisect_right(ends[dst], start[a])
                posts[dst, slot].append((start[a], r, i, recv))
    out = {}
    for r, lst in lists.items():
        seq = []
        for i, a in enumerate(lst):
            seq += [recv for *_, recv in sorted(posts[r, i], key=lambda t: t[:3])]
            seq.append(a)
            seq += sends[r, i]
        seq += [recv for *_, recv in sorted(posts[r, len(lst)], key=lambda t: t[:3])]
        out[r] = seq
    return out, summary
