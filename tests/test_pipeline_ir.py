"""The schedule IR without processes: actions, layouts, text/CSV forms, hand-written
schedules, validation errors and deadlock reports."""

import pickle

import pytest

from tandem.pipeline import (Action, ActionKind, CustomSchedule, DeadlockError, OneFOneB,
                             ScheduleError, StageLayout, TimelineRecord, ZeroBubbleH1,
                             format_csv, format_schedule, lower, parse_csv, parse_schedule,
                             simulate, validate_lowered)

K = ActionKind


# ---- actions ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(ActionKind))
def test_action_prints_and_parses_back(kind):
    a = Action(12, kind, 305)
    assert str(a) == f"12{kind.value}305"
    assert Action.parse(str(a)) == a


def test_action_print_examples():
    assert str(Action(1, K.F, 3)) == "1F3"
    assert Action.parse("0SEND_F2") == Action(0, K.SEND_F, 2)
    assert Action.parse(" 2recv_b0 ") == Action(2, K.RECV_B, 0)
    assert [k.is_compute for k in (K.F, K.B, K.W, K.SEND_F, K.RECV_B)] == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("text", ["", "F3", "1F", "xF3", "1X3", "1SEND3", "1F3F", "-1F3"])
def test_action_parse_rejects_garbage(text):
    with pytest.raises(ValueError, match="cannot parse action"):
        Action.parse(text)


def test_action_checks_its_fields():
    with pytest.raises(ValueError, match="stage must be an int >= 0"):
        Action(-1, K.F, 0)
    with pytest.raises(ValueError, match="microbatch must be an int >= 0"):
        Action(0, K.F, True)
    with pytest.raises(TypeError, match="kind must be an ActionKind"):
        Action(0, "F", 0)


def test_timeline_record_names_its_action():
    rec = TimelineRecord(1, 5, K.W, 2, 0.5, 0.75)
    assert rec.action == Action(5, K.W, 2)
    assert rec.end_s - rec.start_s == 0.25


# ---- layouts ---------------------------------------------------------------------------

def test_looped_layout_maps_ranks_and_virtual_stages():
    layout = StageLayout.looped(4, 2)
    assert (layout.num_ranks, layout.virtual_stages, layout.num_stages) == (4, 2, 8)
    assert layout.stages_of(1) == (1, 5)
    assert [layout.rank_of(s) for s in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert layout.local_index(5) == 1 and layout.local_index(1) == 0
    with pytest.raises(ValueError, match="stage 8 is out of range"):
        layout.rank_of(8)
    # the rank at the other end of a message
    assert layout.peer(Action.parse("3SEND_F0")) == 0  # to stage 4, on rank 0
    assert layout.peer(Action(4, K.RECV_F, 0)) == 3  # from stage 3
    assert layout.peer(Action.parse("4SEND_B1")) == 3  # to stage 3
    assert layout.peer(Action(6, K.RECV_B, 0)) == 3  # from stage 7
    with pytest.raises(ValueError, match="0F0 is not a send or a receive"):
        layout.peer(Action(0, K.F, 0))


def test_layout_rejects_bad_placements():
    with pytest.raises(ValueError, match="num_ranks must be an int >= 1"):
        StageLayout.looped(0)
    with pytest.raises(ValueError, match="same number of stages"):
        StageLayout((0, 0, 1))
    with pytest.raises(ValueError, match=r"ranks \[1\] hold no stage"):
        StageLayout((0, 2))


def test_layout_is_inferred_from_lists():
    v_shape = {0: [Action(0, K.F, 0), Action(3, K.F, 0)], 1: [Action(1, K.F, 0),
                                                           Action(2, K.F, 0)]}
    assert StageLayout.infer(v_shape).ranks == (0, 1, 1, 0)
    with pytest.raises(ScheduleError, match="stage 0 appears on rank 0 and on rank 1"):
        StageLayout.infer({0: [Action(0, K.F, 0)], 1: [Action(0, K.B, 0)]})


# ---- text and CSV ----------------------------------------------------------------------

def test_text_form_round_trips_a_lowered_schedule():
    lowered = lower(ZeroBubbleH1(4, 9))
    assert parse_schedule(format_schedule(lowered)) == lowered


def test_csv_form_round_trips():
    lowered = lower(OneFOneB(4, 5))
    text = format_csv(lowered)
    assert len({line.count(",") for line in text.splitlines()}) == 1  # padded rows
    assert parse_csv(text) == lowered
    assert parse_csv(text + "\n\n,,\n") == lowered  # blank rows at the end, as editors leave them
    with pytest.raises(ScheduleError, match="no rank to write"):
        format_csv({})


def test_text_form_accepts_comments_commas_and_bare_rank_numbers():
    text = """
    # two ranks
    rank 1: 1F0, 1B0   # trailing comment
    0: 0F0 0B0
    """
    assert parse_schedule(text) == {0: [Action(0, K.F, 0), Action(0, K.B, 0)],
                                    1: [Action(1, K.F, 0), Action(1, K.B, 0)]}


def test_text_form_errors_name_the_line():
    with pytest.raises(ScheduleError, match="line 2: expected 'rank <r>: <actions>'"):
        parse_schedule("rank 0: 0F0\nthis is not a rank line")
    with pytest.raises(ScheduleError, match="line 2: rank 0 is listed twice"):
        parse_schedule("rank 0: 0F0\nrank 0: 0B0")
    with pytest.raises(ScheduleError, match="line 1: cannot parse action '0Q0'"):
        parse_schedule("rank 0: 0F0 0Q0")
    with pytest.raises(ScheduleError, match="no 'rank <r>: ...' line"):
        parse_schedule("# nothing\n")
    with pytest.raises(ScheduleError, match="row 2 \\(rank 1\\) column 2"):
        parse_csv("0F0,0B0\n1F0,oops\n")


# ---- hand-written schedules ------------------------------------------------------------

HAND_1F1B = """
rank 0: 0F0 0F1 0B0 0F2 0B1 0B2
rank 1: 1F0 1B0 1F1 1B1 1F2 1B2
"""


def test_hand_written_schedule_runs_like_the_builtin():
    custom = CustomSchedule.from_text(HAND_1F1B, name="hand 1F1B")
    builtin = OneFOneB(2, 3)
    assert custom.compute_actions() == builtin.compute_actions()
    assert (custom.num_ranks, custom.num_stages, custom.num_microbatches,
            custom.virtual_stages, custom.split_backward) == (2, 2, 3, 1, False)
    assert lower(custom) == lower(builtin)
    assert simulate(custom).bubble_fraction == simulate(builtin).bubble_fraction


def test_hand_written_csv_file(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(format_csv(lower(ZeroBubbleH1(2, 4))))
    custom = CustomSchedule.from_csv(path)
    assert custom.name == "mine" and custom.split_backward
    assert lower(custom) == lower(ZeroBubbleH1(2, 4))  # lowered lists are kept as written


def test_hand_written_v_shape_layout():
    # 2 ranks, 4 stages placed 0,1 | 1,0 (rank 1 holds stages 1 and 2: local hand-over)
    text = """
    rank 0: 0F0 3F0 3B0 0B0
    rank 1: 1F0 2F0 2B0 1B0
    """
    custom = CustomSchedule.from_text(text)
    assert custom.layout.ranks == (0, 1, 1, 0) and custom.virtual_stages == 2
    lowered = lower(custom)
    assert format_schedule(lowered) == (
        "rank 0: 0F0 0SEND_F0 3RECV_F0 3F0 3B0 3SEND_B0 0RECV_B0 0B0\n"
        "rank 1: 1RECV_F0 1F0 2F0 2SEND_F0 2RECV_B0 2B0 1B0 1SEND_B0\n")
    assert validate_lowered(lowered).layout == custom.layout
    assert simulate(custom).makespan == 12  # 4 F + 4 full B, one after the other


@pytest.mark.parametrize("text, message", [
    ("rank 0: 0F0 0B0 0F1\nrank 1: 1F0 1B0 1F1 1B1", r"0B1 is missing"),
    ("rank 0: 0F0 0F0 0B0\nrank 1: 1F0 1B0", r"0F0 appears twice"),
    ("rank 0: 0B0 0F0\nrank 1: 1F0 1B0", r"rank 0 step 0: 0B0 comes before 0F0"),
    ("rank 0: 0F0 0B0 0W0 0F1 0B1\nrank 1: 1F0 1B0 1W0 1F1 1B1 1W1", r"0W1 is missing.*or none"),
    ("rank 0: 0F0 0B0\nrank 1: 1F0 1B0\nrank 2:", r"ranks \[2\] hold no action"),
    ("rank 0: 0F0 1B0\nrank 1: 1F0 0B0", r"stage 1 appears on rank 0 and on rank 1"),
    ("rank 0: 0F0 0B0\nrank 2: 2F0 2B0", r"ranks must be 0..R-1"),
])
def test_malformed_hand_written_schedules_are_refused(text, message):
    with pytest.raises(ScheduleError, match=message):
        CustomSchedule.from_text(text)


@pytest.mark.parametrize("text, message", [
    # a send with no receive on the other side
    ("rank 0: 0F0 0SEND_F0 0B0\nrank 1: 1F0 1B0", r"lack .*1RECV_F0"),
    # a receive posted after the compute that needs it
    ("rank 0: 0F0 0SEND_F0 0RECV_B0 0B0\nrank 1: 1F0 1RECV_F0 1B0 1SEND_B0",
     r"rank 1 step 1: 1RECV_F0 must come before 1F0"),
    # a message between stages of one rank, or past the last stage
    ("rank 0: 0F0 0SEND_F0 0B0", r"0SEND_F0 matches no message"),
    # two messages in opposite orders on the two ends
    ("rank 0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0RECV_B1 0B0 0B1\n"
     "rank 1: 1RECV_F1 1RECV_F0 1F0 1B0 1SEND_B0 1F1 1B1 1SEND_B1",
     r"from rank 0 to rank 1 are out of order: message 0 is 0SEND_F0 on rank 0 but 1RECV_F1"),
])
def test_malformed_lowered_lists_are_refused(text, message):
    with pytest.raises(ScheduleError, match=message):
        CustomSchedule.from_text(text)


# ---- deadlocks -------------------------------------------------------------------------

def test_compute_order_deadlock_is_reported_with_the_steps():
    # rank 0 wants 0B0 (needs 1B0) before 0F1; rank 1 wants 1F1 (needs 0F1) before 1F0
    text = """
    rank 0: 0F0 0B0 0F1 0B1
    rank 1: 1F1 1F0 1B0 1B1
    """
    with pytest.raises(DeadlockError) as info:
        CustomSchedule.from_text(text)
    err = info.value
    assert set(err.blocked) == {0, 1}
    assert err.blocked[0][:2] == (1, Action(0, K.B, 0))
    assert err.blocked[1][:2] == (0, Action(1, K.F, 1))
    assert "rank 0 step 1 (0B0) waits for 1B0 (rank 1 step 2)" in str(err)
    assert "rank 1 step 0 (1F1) waits for 0F1 (rank 0 step 2)" in str(err)
    with pytest.raises(DeadlockError):  # the same from the lowering of bare lists
        lower(parse_schedule(text))
    copy = pickle.loads(pickle.dumps(err))  # crosses process boundaries intact
    assert str(copy) == str(err) and copy.blocked == err.blocked


BLOCKING_1F1B = """
# 1F1B with blocking sends and receives posted just before use: each rank's send
# waits for a receive that the other rank posts only after its own send
rank 0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1
rank 1: 1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1
"""


def test_send_receive_deadlock_is_reported_with_the_steps():
    with pytest.raises(DeadlockError) as info:
        simulate(parse_schedule(BLOCKING_1F1B))
    message = str(info.value)
    assert "rank 0 step 3 (0SEND_F1) waits for 1RECV_F1 to be posted (rank 1 step 4)" in message
    assert "rank 1 step 3 (1SEND_B0) waits for 0RECV_B0 to be posted (rank 0 step 4)" in message
    assert info.value.time == 4.0  # rank 1 ends 1B0 at 4 (F = 1, full B = 2)


def test_posting_receives_early_removes_that_deadlock():
    early = BLOCKING_1F1B.replace("0SEND_F1 0RECV_B0", "0RECV_B0 0SEND_F1").replace(
        "1SEND_B0 1RECV_F1", "1RECV_F1 1SEND_B0")
    result = simulate(CustomSchedule.from_text(early))
    assert result.makespan == 9.0  # (m + p - 1)(F + B), as 1F1B
