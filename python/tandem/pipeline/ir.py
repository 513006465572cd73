"""The pipeline schedule IR: actions, where stages live, and timeline records.

A schedule is data: ``dict[rank, list[Action]]``, one ordered list of actions per pipeline
rank. An action names a (virtual) stage, a kind and a microbatch, and prints as
``"<stage><kind><microbatch>"``: ``1F3`` is the forward of microbatch 3 on stage 1,
``2SEND_B0`` is stage 2 sending the input gradient of microbatch 0 to stage 1.

Kinds: F (forward), B (backward: the input gradient when the schedule also has W for that
stage and microbatch, else the full backward), W (weight gradient), and the communication
kinds that ``lower`` inserts:

- ``SEND_F(s, mb)``: stage s sends its forward output of mb to stage s + 1.
- ``RECV_F(s, mb)``: stage s posts the receive of its forward input of mb from stage s - 1.
- ``SEND_B(s, mb)``: stage s sends the gradient of its input of mb to stage s - 1.
- ``RECV_B(s, mb)``: stage s posts the receive of its output gradient of mb from stage s + 1.

Stages are virtual: with ``v`` stages per rank, stage ``s`` of ``p * v`` lives on one rank,
given by a ``StageLayout`` (``StageLayout.looped(p, v)`` puts stage s on rank ``s % p``, so
rank r holds stages r, r + p, r + 2p, ...).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

__all__ = [
    "ActionKind",
    "Action",
    "StageLayout",
    "TimelineRecord",
    "ScheduleError",
    "DeadlockError",
]


class ActionKind(enum.Enum):
    """What an action does (see the module docstring)."""

    F = "F"
    B = "B"
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    # members are singletons compared by identity: hash them by identity too, in C (Enum's
    # own __hash__ is a Python call, and the simulator hashes actions millions of times)
    __hash__ = object.__hash__

    @property
    def is_compute(self) -> bool:
        """True for F, B and W."""
        return self in _COMPUTE


_COMPUTE = frozenset({ActionKind.F, ActionKind.B, ActionKind.W})
# Longest names first so that "SEND_F" is not read as "SEND_" + "F".
_KIND_NAMES = sorted((k.value for k in ActionKind), key=len, reverse=True)
_ACTION_RE = re.compile(r"(\d+)(" + "|".join(_KIND_NAMES) + r")(\d+)")


def _check_index(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class Action:
    """One step of one rank: ``kind`` on ``stage`` for ``microbatch``; prints as "1F3"."""

    stage: int
    kind: ActionKind
    microbatch: int

    def __post_init__(self):
        _check_index("stage", self.stage)
        _check_index("microbatch", self.microbatch)
        if not isinstance(self.kind, ActionKind):
            raise TypeError(f"kind must be an ActionKind, got {self.kind!r}")

    @classmethod
    def _unchecked(cls, stage: int, kind: ActionKind, microbatch: int) -> "Action":
        """An Action from values already known valid (lowering builds many)."""
        a = object.__new__(cls)
        object.__setattr__(a, "stage", stage)
        object.__setattr__(a, "kind", kind)
        object.__setattr__(a, "microbatch", microbatch)
        return a

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Parse the printed form: ``Action.parse("1F3") == Action(1, ActionKind.F, 3)``."""
        if not isinstance(text, str):
            raise TypeError(f"an action is parsed from a str, got {type(text).__name__}")
        match = _ACTION_RE.fullmatch(text.strip().upper())
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected <stage><kind><microbatch> such as "
                f"'1F3' or '0SEND_F2', with kind one of {', '.join(k.value for k in ActionKind)}"
            )
        return cls(int(match[1]), ActionKind(match[2]), int(match[3]))


@dataclass(frozen=True)
class StageLayout:
    """Which rank holds each (virtual) stage: ``ranks[stage] = rank``.

    Every rank 0..num_ranks-1 holds the same number of stages, ``virtual_stages``. Stages on
    one rank are listed in increasing order by ``stages_of``; ``local_index(stage)`` is the
    position of a stage among its rank's stages (the model chunk index on that rank).
    """

    ranks: tuple[int, ...]
    _stages_of: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        ranks = tuple(self.ranks)
        object.__setattr__(self, "ranks", ranks)
        if not ranks:
            raise ValueError("a StageLayout needs at least one stage")
        for r in ranks:
            _check_index("rank", r)
        num_ranks = max(ranks) + 1
        stages_of = tuple(tuple(s for s, r in enumerate(ranks) if r == rank)
                          for rank in range(num_ranks))
        empty = [r for r, stages in enumerate(stages_of) if not stages]
        if empty:
            raise ValueError(f"ranks {empty} hold no stage (stage -> rank: {list(ranks)}); "
                             "every rank 0..num_ranks-1 must hold at least one stage")
        counts = {len(stages) for stages in stages_of}
        if len(counts) != 1:
            raise ValueError(f"every rank must hold the same number of stages, got "
                             f"{ {r: list(s) for r, s in enumerate(stages_of)} }")
        object.__setattr__(self, "_stages_of", stages_of)

    @classmethod
    def looped(cls, num_ranks: int, virtual_stages: int = 1) -> "StageLayout":
        """Stage s on rank ``s % num_ranks``: rank r holds stages r, r + p, r + 2p, ..."""
        for name, value in (("num_ranks", num_ranks), ("virtual_stages", virtual_stages)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        return cls(tuple(s % num_ranks for s in range(num_ranks * virtual_stages)))

    @classmethod
    def infer(cls, actions: Mapping[int, Sequence[Action]]) -> "StageLayout":
        """The layout that ``actions`` imply: each stage must appear on exactly one rank."""
        owner: dict[int, int] = {}
        for rank, lst in actions.items():
            for step, a in enumerate(lst):
                if owner.setdefault(a.stage, rank) != rank:
                    raise ScheduleError(
                        f"stage {a.stage} appears on rank {owner[a.stage]} and on rank {rank} "
                        f"(step {step}: {a}); a stage lives on exactly one rank")
        missing = sorted(set(range(max(owner, default=-1) + 1)) - set(owner))
        if not owner or missing:
            raise ScheduleError(f"stages must be numbered 0..S-1 with none left out; "
                                f"missing {missing or 'all'}")
        try:
            return cls(tuple(owner[s] for s in range(len(owner))))
        except ValueError as e:
            raise ScheduleError(str(e)) from None

    @property
    def num_stages(self) -> int:
        return len(self.ranks)

    @property
    def num_ranks(self) -> int:
        return len(self._stages_of)

    @property
    def virtual_stages(self) -> int:
        return len(self._stages_of[0])

    def rank_of(self, stage: int) -> int:
        if not 0 <= stage < len(self.ranks):
            raise ValueError(f"stage {stage} is out of range 0..{len(self.ranks) - 1}")
        return self.ranks[stage]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        if not 0 <= rank < len(self._stages_of):
            raise ValueError(f"rank {rank} is out of range 0..{len(self._stages_of) - 1}")
        return self._stages_of[rank]

    def local_index(self, stage: int) -> int:
        return self._stages_of[self.rank_of(stage)].index(stage)

    def peer(self, action: Action) -> int:
        """The rank at the other end of a SEND_F / RECV_F / SEND_B / RECV_B action."""
        offset = {ActionKind.SEND_F: 1, ActionKind.RECV_B: 1,
                  ActionKind.RECV_F: -1, ActionKind.SEND_B: -1}.get(action.kind)
        if offset is None:
            raise ValueError(f"{action} is not a send or a receive")
        return self.rank_of(action.stage + offset)


class TimelineRecord(NamedTuple):
    """One executed action: what ran where, from ``start_s`` to ``end_s``.

    The simulator produces these in cost units (seconds when the costs are seconds); the
    runtime produces them from measured clocks. ``render`` draws either.
    """

    rank: int
    stage: int
    kind: ActionKind
    microbatch: int
    start_s: float
    end_s: float

    @property
    def action(self) -> Action:
        return Action(self.stage, self.kind, self.microbatch)


class ScheduleError(ValueError):
    """Action lists that cannot run as given; the message says where and why."""


class DeadlockError(ScheduleError):
    """No rank can make progress. ``blocked`` maps each stuck rank to
    ``(step, action, what it waits for)``; ``time`` is when the last rank stopped."""

    def __init__(self, blocked: dict[int, tuple[int, Action, str]], time: float):
        self.blocked = blocked
        self.time = time
        lines = [f"rank {r} step {step} ({a}) waits for {why}"
                 for r, (step, a, why) in sorted(blocked.items())]
        super().__init__(f"schedule deadlocks (no rank can proceed after time {time:g}):\n  "
                         + "\n  ".join(lines))

    def __reduce__(self):
        return type(self), (self.blocked, self.time)
