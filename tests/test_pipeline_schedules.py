"""Built-in schedules, lowering and the simulator, without processes.

Every schedule for p in {2, 4}, m in {p, 2p, 3p + 1} (and v in {1, 2} for interleaving):
each F/B/W once, dependencies respected, lowering matched and deadlock-free; in-flight
and bubble figures against the closed forms of the literature.
"""

from collections import Counter

import pytest

from tandem.pipeline import (Action, ActionKind, Costs, GPipe, Interleaved1F1B, OneFOneB,
                             ZeroBubbleH1, bubble_fraction, lower, simulate, validate_lowered)

K = ActionKind

SCHEDULES = {
    "GPipe": lambda p, m: GPipe(p, m),
    "1F1B": lambda p, m: OneFOneB(p, m),
    "Interleaved-v1": lambda p, m: Interleaved1F1B(p, m, virtual_stages=1),
    "Interleaved-v2": lambda p, m: Interleaved1F1B(p, m, virtual_stages=2),
    "ZB-H1": lambda p, m: ZeroBubbleH1(p, m),
}
CASES = [(name, p, m) for name in SCHEDULES for p in (2, 4) for m in (p, 2 * p, 3 * p + 1)]
# the only combinations a schedule refuses: interleaving needs m to be a multiple of p
REFUSED = {(name, p, m) for name, p, m in CASES if name == "Interleaved-v2" and m % p}
RUNNABLE = [case for case in CASES if case not in REFUSED]


def _ids(case):
    return "{}-p{}-m{}".format(*case)


@pytest.mark.parametrize("case", sorted(REFUSED), ids=_ids)
def test_refused_combinations_say_what_to_do(case):
    name, p, m = case
    with pytest.raises(ValueError, match=rf"num_microbatches \({m}\) must be a multiple of "
                                         rf"num_ranks \({p}\).*use num_microbatches={m - 1} "
                                         rf"or {m - 1 + p}"):
        SCHEDULES[name](p, m)


@pytest.mark.parametrize("case", RUNNABLE, ids=_ids)
def test_every_action_exactly_once_on_its_rank(case):
    name, p, m = case
    sched = SCHEDULES[name](p, m)
    v = sched.virtual_stages
    assert (sched.num_ranks, sched.num_microbatches, sched.num_stages) == (p, m, p * v)
    kinds = (K.F, K.B, K.W) if sched.split_backward else (K.F, K.B)
    lists = sched.compute_actions()
    assert sorted(lists) == list(range(p))
    for rank, lst in lists.items():
        assert {a.stage for a in lst} == set(sched.layout.stages_of(rank))
        assert {a.stage for a in lst} == {rank + k * p for k in range(v)}
    counts = Counter(a for lst in lists.values() for a in lst)
    expected = {Action(s, k, mb) for s in range(p * v) for k in kinds for mb in range(m)}
    assert set(counts) == expected
    assert set(counts.values()) == {1}


def _check_dependencies(result, num_stages):
    """Every action starts after what it needs: inputs ended and landed, receives posted."""
    at = {rec.action: rec for rec in result.timeline}
    assert len(at) == len(result.timeline)
    for rec in result.timeline:
        a, s, mb = rec.action, rec.stage, rec.microbatch
        ended, landed, posted = [], [], []
        if a.kind is K.F and s > 0:
            ended.append(Action(s - 1, K.F, mb))
            landed.append(Action(s - 1, K.SEND_F, mb))
        elif a.kind is K.B:
            ended.append(Action(s, K.F, mb))
            if s + 1 < num_stages:
                ended.append(Action(s + 1, K.B, mb))
                landed.append(Action(s + 1, K.SEND_B, mb))
        elif a.kind is K.W:
            ended.append(Action(s, K.B, mb))
        elif a.kind is K.SEND_F:
            ended.append(Action(s, K.F, mb))
            posted.append(Action(s + 1, K.RECV_F, mb))
        elif a.kind is K.SEND_B:
            ended.append(Action(s, K.B, mb))
            posted.append(Action(s - 1, K.RECV_B, mb))
        for dep in ended:
            assert at[dep].end_s <= rec.start_s, f"{a} starts before {dep} ends"
        for send in landed:  # a send's record ends when its data has landed
            assert at[send].end_s <= rec.start_s, f"{a} starts before {send} lands"
        for recv in posted:
            assert at[recv].start_s <= rec.start_s, f"{a} starts before {recv} is posted"


@pytest.mark.parametrize("case", RUNNABLE, ids=_ids)
def test_lowering_is_matched_and_runs_without_deadlock(case):
    name, p, m = case
    sched = SCHEDULES[name](p, m)
    lowered = lower(sched)
    summary = validate_lowered(lowered)  # one send and one receive per message, FIFO order
    assert summary.layout == sched.layout and summary.num_microbatches == m
    sends = sum(a.kind in (K.SEND_F, K.SEND_B) for lst in lowered.values() for a in lst)
    assert sends == 2 * m * (p * sched.virtual_stages - 1)  # every stage boundary crosses ranks
    assert [a for a in lowered[1] if a.kind.is_compute] == sched.compute_actions()[1]
    result = simulate(lowered)
    _check_dependencies(result, sched.num_stages)
    # receives are posted before their data exists: no send ever waits under unit costs
    produced = {rec.action: rec.end_s for rec in result.timeline if rec.kind.is_compute}
    for rec in result.timeline:
        if rec.kind in (K.SEND_F, K.SEND_B):
            src = Action(rec.stage, K.F if rec.kind is K.SEND_F else K.B, rec.microbatch)
            assert rec.start_s == produced[src]


@pytest.mark.parametrize("case", RUNNABLE, ids=_ids)
def test_lowered_lists_never_deadlock_under_other_costs(case):
    name, p, m = case
    sched = SCHEDULES[name](p, m)
    lowered = lower(sched)  # posted for unit costs, run with very different ones
    skewed = {s: Costs(F=1 + s, B=3.0 / (1 + s), W=0.25, comm=0.5)
              for s in range(sched.num_stages)}
    result = simulate(lowered, skewed)
    _check_dependencies(result, sched.num_stages)
    assert 0 < result.bubble_fraction < 1


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_in_flight_1f1b_keeps_p_gpipe_keeps_m(p, k):
    m = k * p + (k == 3)
    assert simulate(OneFOneB(p, m)).peak_in_flight[0] == p
    assert simulate(OneFOneB(p, m)).peak_in_flight == {s: p - s for s in range(p)}
    assert simulate(GPipe(p, m)).peak_in_flight[0] == m
    assert max(simulate(ZeroBubbleH1(p, m)).peak_in_flight.values()) == p  # 1F1B's peak


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_bubbles_with_unit_costs(p, k):
    m = k * p + (k == 3)
    one_f_one_b = simulate(OneFOneB(p, m)).bubble_fraction
    assert one_f_one_b == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert simulate(GPipe(p, m)).bubble_fraction == pytest.approx(one_f_one_b, abs=1e-12)
    zb = simulate(ZeroBubbleH1(p, m)).bubble_fraction
    assert zb == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)
    assert zb < 0.5 * one_f_one_b  # about a third; exactly (m+p-1)/(3m+p-1) of it
    assert zb / one_f_one_b == pytest.approx((m + p - 1) / (3 * m + p - 1))
    if m % p == 0:
        interleaved = simulate(Interleaved1F1B(p, m, virtual_stages=2)).bubble_fraction
        assert interleaved == pytest.approx((p - 1) / (2 * m + p - 1), abs=1e-12)


def test_interleaved_v1_is_1f1b_and_v2_uses_looped_stages():
    assert Interleaved1F1B(4, 6, virtual_stages=1).compute_actions() == \
        OneFOneB(4, 6).compute_actions()
    sched = Interleaved1F1B(2, 4, virtual_stages=2)
    assert sched.layout.stages_of(0) == (0, 2) and sched.layout.stages_of(1) == (1, 3)
    assert " ".join(map(str, sched.compute_actions()[0])) == (
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3")


def test_zero_bubble_h1_delays_w_by_the_rank():
    lists = ZeroBubbleH1(4, 8).compute_actions()
    assert " ".join(map(str, lists[3][:12])) == "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3W0 3F4 3B4 3W1"
    assert " ".join(map(str, lists[0][:8])) == "0F0 0F1 0F2 0F3 0B0 0W0 0F4 0B1"


@pytest.mark.parametrize("cls", [GPipe, OneFOneB, ZeroBubbleH1, Interleaved1F1B])
def test_too_few_microbatches_is_a_clear_error(cls):
    with pytest.raises(ValueError, match=r"num_microbatches \(3\) < num_ranks \(4\).*"
                                         r"use num_microbatches >= 4"):
        cls(4, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_ranks=0, num_microbatches=4), "num_ranks must be an int >= 1, got 0"),
    (dict(num_ranks=2.0, num_microbatches=4), "num_ranks must be an int >= 1, got 2.0"),
    (dict(num_ranks=2, num_microbatches=True), "num_microbatches must be an int >= 1"),
    (dict(num_ranks=2, num_microbatches=4, virtual_stages=0), "virtual_stages must be an int"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Interleaved1F1B(**kwargs)


def test_compute_actions_are_fresh_copies():
    sched = OneFOneB(2, 2)
    sched.compute_actions()[0].clear()
    assert len(sched.compute_actions()[0]) == 4
    assert repr(Interleaved1F1B(2, 4)) == \
        "Interleaved1F1B(num_ranks=2, num_microbatches=4, virtual_stages=2)"


def test_costs_are_checked():
    with pytest.raises(ValueError, match="Costs.F must be a finite number > 0"):
        Costs(F=0)
    with pytest.raises(ValueError, match="Costs.comm must be a finite number >= 0"):
        Costs(comm=-1.0)
    with pytest.raises(ValueError, match="costs has no entry for stage 1"):
        simulate(OneFOneB(2, 2), {0: Costs()})


def test_costs_shape_the_timeline():
    # full backward = B + W; comm delays the consumer, not the sender
    result = simulate(GPipe(2, 2), Costs(F=1.0, B=2.0, W=1.0, comm=0.5))
    times = {str(rec.action): (rec.start_s, rec.end_s) for rec in result.timeline}
    assert times["1F0"] == (1.5, 2.5) and times["0F1"] == (1.0, 2.0)
    assert times["1B0"] == (3.5, 6.5)  # after 1F1, which waits for 0F1 + comm
    assert result.makespan == 13.0


def test_posting_costs_hold_the_rank():
    # 1F1B, p=2, m=2: rank 1 posts RECV_F0 and RECV_F1 (0.25 each) before 1F0; every send
    # holds its rank for 0.5 after its F or B (a full backward costs B + W = 2)
    costs = Costs(F=1.0, B=1.0, W=1.0, comm=0.5, post_send=0.5, post_recv=0.25)
    result = simulate(OneFOneB(2, 2), costs)
    times = {str(rec.action): (rec.start_s, rec.end_s) for rec in result.timeline}
    assert times["1RECV_F0"] == (0.0, 0.25) and times["1RECV_F1"] == (0.25, 0.5)
    assert times["0SEND_F0"] == (1.0, 1.5)  # the rank is held as long as the transfer
    assert times["0F1"] == (1.5, 2.5)
    assert times["1F0"] == (1.5, 2.5)  # 0F0 ends at 1.0, its data lands comm = 0.5 later
    assert times["1F1"][0] == 5.0  # after 1B0 (2.5 .. 4.5) and its send (0.5)
    assert times["0B1"][0] == 8.5  # 1B1 ends at 8.0, its data lands 0.5 later
    # data lands max(comm, post_send) after the send started
    slow_post = simulate(OneFOneB(2, 2), Costs(F=1.0, B=1.0, W=1.0, comm=0.2, post_send=0.5))
    assert {str(r.action): r.start_s for r in slow_post.timeline}["1F0"] == 1.5
    free = simulate(OneFOneB(2, 2), Costs(F=1.0, B=1.0, W=1.0, comm=0.5))
    assert result.makespan > free.makespan
    assert result.bubble_fraction > free.bubble_fraction  # posting is not compute
    with pytest.raises(ValueError, match="Costs.post_send must be a finite number >= 0"):
        Costs(post_send=-1.0)
    with pytest.raises(ValueError, match="Costs.post_recv must be a finite number >= 0"):
        Costs(post_recv=float("nan"))


def test_durations_replay_single_actions():
    # one slow action: 0F1 takes 3.0 instead of 1.0, and everything that waits on it moves
    costs = Costs(F=1.0, B=2.0, W=1.0, comm=0.5)
    slow = simulate(GPipe(2, 2), costs, durations={Action(0, ActionKind.F, 1): 3.0})
    times = {str(rec.action): (rec.start_s, rec.end_s) for rec in slow.timeline}
    assert times["0F1"] == (1.0, 4.0) and times["1F0"] == (1.5, 2.5)
    assert times["1F1"] == (4.5, 5.5)  # 0F1's data lands comm = 0.5 after it ends
    assert slow.makespan == simulate(GPipe(2, 2), costs).makespan + 2.0
    # a timeline replayed with its own durations, under other stage costs, is itself
    lowered = lower(OneFOneB(2, 4))
    planned = simulate(lowered, Costs(F=1.0, B=1.5, W=0.5, comm=0.3, post_send=0.2, post_recv=0.1))
    own = {rec.action: rec.end_s - rec.start_s for rec in planned.timeline}
    # a simulated SEND record spans the transfer; its duration here is its posting time
    own.update({a: 0.2 for a in own if a.kind in (ActionKind.SEND_F, ActionKind.SEND_B)})
    replay = simulate(lowered, Costs(F=9.0, B=9.0, W=9.0, comm=0.3), durations=own)
    assert [(r.action, r.start_s) for r in replay.timeline] == \
        [(r.action, r.start_s) for r in planned.timeline]
    with pytest.raises(ValueError, match=r"durations\[0F1\] must be a finite number >= 0"):
        simulate(GPipe(2, 2), durations={Action(0, ActionKind.F, 1): -1.0})
    with pytest.raises(TypeError, match="durations: keys must be Actions"):
        simulate(GPipe(2, 2), durations={"0F1": 1.0})


def test_bubble_fraction_of_a_measured_timeline():
    result = simulate(OneFOneB(4, 8))
    # the same timeline in seconds, shifted: the bubble is scale and shift free
    shifted = [rec._replace(start_s=10 + rec.start_s / 100, end_s=10 + rec.end_s / 100)
               for rec in result.timeline]
    assert bubble_fraction(shifted) == pytest.approx(result.bubble_fraction)
    with pytest.raises(ValueError, match="no F, B or W record"):
        bubble_fraction([])


def test_schedules_by_name():
    """The names `tandem train --schedule` and `tandem plan` take, in one place."""
    from tandem.cli.train_options import SCHEDULES as TRAIN_NAMES
    from tandem.pipeline.schedules import SCHEDULES as BY_NAME
    from tandem.pipeline.schedules import schedule_by_name

    assert sorted(TRAIN_NAMES) == sorted(BY_NAME)
    for name, cls in BY_NAME.items():
        sched = schedule_by_name(name, 2, 4)
        assert type(sched) is cls and sched.num_microbatches == 4
    assert schedule_by_name("interleaved", 2, 4, virtual_stages=3).num_stages == 6
    with pytest.raises(ValueError, match="unknown schedule '2f2b'"):
        schedule_by_name("2f2b", 2, 4)
