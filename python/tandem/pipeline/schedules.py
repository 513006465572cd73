"""Built-in pipeline schedules: GPipe, 1F1B, interleaved 1F1B and zero-bubble ZB-H1.

Each schedule produces one ordered list of compute actions (F, B, W) per pipeline rank;
``lower`` adds the sends and receives. Notation: p pipeline ranks, m microbatches, v virtual
stages per rank (stage s on rank ``s % p``), microbatches and ranks counted from 0.
"""

from __future__ import annotations

import abc

from tandem.pipeline.ir import Action, ActionKind, StageLayout

__all__ = ["Schedule", "GPipe", "OneFOneB", "Interleaved1F1B", "ZeroBubbleH1", "SCHEDULES", "schedule_by_name"]

F, B, W = ActionKind.F, ActionKind.B, ActionKind.W


def _check_count(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class Schedule(abc.ABC):
    """Per-rank compute action lists for one training step.

    Attributes: ``num_ranks`` (pipeline ranks, p), ``virtual_stages`` (stages per rank, v),
    ``num_stages`` (p * v: the stage indices used by the actions), ``num_microbatches``,
    ``layout`` (which rank holds each stage) and ``split_backward`` (True when the
    backward is split into B = input gradient and W = weight gradient).
    """

    split_backward: bool = False

    def __init__(self, num_ranks: int, num_microbatches: int, *, virtual_stages: int = 1):
        _check_count("num_ranks", num_ranks)
        _check_count("num_microbatches", num_microbatches)
        _check_count("virtual_stages", virtual_stages)
        self.num_ranks = num_ranks
        self.num_microbatches = num_microbatches
        self.virtual_stages = virtual_stages

    @property
    def num_stages(self) -> int:
        return self.num_ranks * self.virtual_stages

    @property
    def layout(self) -> StageLayout:
        return StageLayout.looped(self.num_ranks, self.virtual_stages)

    def compute_actions(self) -> dict[int, list[Action]]:
        """``{rank: [F/B/W actions in execution order]}``, a fresh copy on every call."""
        return {r: self._rank_actions(r) for r in range(self.num_ranks)}

    @abc.abstractmethod
    def _rank_actions(self, rank: int) -> list[Action]:
        """The compute actions of ``rank``, in execution order."""

    def _lowered_as_written(self) -> dict[int, list[Action]] | None:
        """Action lists that already hold sends and receives (hand-written), else None."""
        return None

    def _require_enough_microbatches(self) -> None:
        if self.num_microbatches < self.num_ranks:
            raise ValueError(
                f"{type(self).__name__}: num_microbatches ({self.num_microbatches}) < "
                f"num_ranks ({self.num_ranks}): the pipeline never fills; "
                f"use num_microbatches >= {self.num_ranks} or fewer pipeline ranks")

    def __repr__(self) -> str:
        v = f", virtual_stages={self.virtual_stages}" if self.virtual_stages != 1 else ""
        return (f"{type(self).__name__}(num_ranks={self.num_ranks}, "
                f"num_microbatches={self.num_microbatches}{v})")


class GPipe(Schedule):
    """All forwards, then all backwards (Huang et al., 2019).

    Rank r: F(r, 0..m-1), then B(r, 0..m-1). Stage 0 holds all m microbatches' activations;
    the bubble is (p - 1) / (m + p - 1) with equal stage costs.
    """

    def __init__(self, num_ranks: int, num_microbatches: int):
        super().__init__(num_ranks, num_microbatches)
        self._require_enough_microbatches()

    def _rank_actions(self, rank: int) -> list[Action]:
        m = self.num_microbatches
        return [Action(rank, F, i) for i in range(m)] + [Action(rank, B, i) for i in range(m)]


def _one_f_one_b(rank: int, p: int, m: int) -> list[Action]:
    warmup = min(p - 1 - rank, m)
    # warm-up: fill the pipeline below this rank
    out = [Action(rank, F, i) for i in range(warmup)]
    # steady state: one forward, one backward
    for i in range(m - warmup):
        out += [Action(rank, F, warmup + i), Action(rank, B, i)]
    # cool-down: drain the backwards still in flight
    out += [Action(rank, B, i) for i in range(m - warmup, m)]
    return out


class OneFOneB(Schedule):
    """1F1B (PipeDream-Flush, Narayanan et al., 2021).

    Rank r runs p - 1 - r warm-up forwards, then alternates one forward and one backward,
    then drains the remaining backwards. At most p - r microbatches are in flight on rank r
    (p on stage 0, against m for GPipe); the bubble is the same as GPipe's.
    """

    def __init__(self, num_ranks: int, num_microbatches: int):
        super().__init__(num_ranks, num_microbatches)
        self._require_enough_microbatches()

    def _rank_actions(self, rank: int) -> list[Action]:
        return _one_f_one_b(rank, self.num_ranks, self.num_microbatches)


class Interleaved1F1B(Schedule):
    """Interleaved 1F1B (Narayanan et al., 2021; Megatron-LM's order).

    Rank r holds v stages r, r + p, ..., r + (v-1)p (model chunks). Its m * v forward units
    run in rounds of p microbatches per chunk: unit k is chunk ``(k // p) % v`` of
    microbatch ``(k // (p v)) p + k % p``; backward units take the chunks in reverse.
    Warm-up is ``(v - 1) p + 2 (p - 1 - r)`` forward units, then one forward and one
    backward unit alternate, then the remaining backward units drain. The bubble shrinks
    about v-fold against 1F1B. num_microbatches must be a multiple of num_ranks when
    virtual_stages > 1; with virtual_stages=1 this is exactly 1F1B.
    """

    def __init__(self, num_ranks: int, num_microbatches: int, *, virtual_stages: int = 2):
        super().__init__(num_ranks, num_microbatches, virtual_stages=virtual_stages)
        self._require_enough_microbatches()
        p, m = num_ranks, num_microbatches
        if virtual_stages > 1 and m % p:
            lo, hi = (m // p) * p, (m // p + 1) * p
            raise ValueError(
                f"Interleaved1F1B with virtual_stages={virtual_stages}: num_microbatches "
                f"({m}) must be a multiple of num_ranks ({p}), since microbatches run in "
                f"rounds of {p} per chunk; use num_microbatches={lo} or {hi}")

    def _unit(self, rank: int, k: int, backward: bool) -> Action:
        p, v = self.num_ranks, self.virtual_stages
        chunk = (k // p) % v
        if backward:
            chunk = v - 1 - chunk
        microbatch = (k // (p * v)) * p + k % p
        return Action(chunk * p + rank, B if backward else F, microbatch)

    def _rank_actions(self, rank: int) -> list[Action]:
        p, m, v = self.num_ranks, self.num_microbatches, self.virtual_stages
        if v == 1:
            return _one_f_one_b(rank, p, m)
        total = m * v
        warmup = min((v - 1) * p + 2 * (p - 1 - rank), total)
        # warm-up: forward units only
        out = [self._unit(rank, k, False) for k in range(warmup)]
        # steady state: one forward unit, one backward unit
        for i in range(total - warmup):
            out += [self._unit(rank, warmup + i, False), self._unit(rank, i, True)]
        # cool-down: the remaining backward units
        out += [self._unit(rank, k, True) for k in range(total - warmup, total)]
        return out


class ZeroBubbleH1(Schedule):
    """ZB-H1 (Qi et al., 2024, "Zero Bubble Pipeline Parallelism"), split backward.

    The backward is split into B (input gradient, on the critical path between stages) and
    W (weight gradient, needed by no other stage). F and B follow 1F1B; rank r delays each
    W by r microbatches so that W fills the slots where 1F1B waits:

        F 0..p-r-1;  for j in 0..m-1: B j, W j-r, F j+p-r;  then the W left over

    (terms outside 0..m-1 are skipped). At most p microbatches are in flight on any rank,
    as in 1F1B, and with F = B = W the bubble is (p - 1) / (3m + p - 1), about a third of
    1F1B's.
    """

    split_backward = True

    def __init__(self, num_ranks: int, num_microbatches: int):
        super().__init__(num_ranks, num_microbatches)
        self._require_enough_microbatches()

    def _rank_actions(self, rank: int) -> list[Action]:
        p, m = self.num_ranks, self.num_microbatches
        ahead = p - rank  # forwards started before the first backward
        out = [Action(rank, F, i) for i in range(min(ahead, m))]
        for j in range(m):
            out.append(Action(rank, B, j))
            if j - rank >= 0:
                out.append(Action(rank, W, j - rank))
            if j + ahead < m:
                out.append(Action(rank, F, j + ahead))
        out += [Action(rank, W, i) for i in range(max(m - rank, 0), m)]
        return out


SCHEDULES = {"gpipe": GPipe, "1f1b": OneFOneB, "interleaved": Interleaved1F1B, "zb-h1": ZeroBubbleH1}
"""The schedules by the names `tandem train --schedule` and `tandem plan` use."""


def schedule_by_name(name: str, num_stages: int, num_microbatches: int, *, virtual_stages: int = 2) -> Schedule:
    """``SCHEDULES[name]`` over ``num_stages`` ranks (interleaved: ``virtual_stages`` per rank)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: one of {', '.join(SCHEDULES)}")
    if name == "interleaved":
        return Interleaved1F1B(num_stages, num_microbatches, virtual_stages=virtual_stages)
    return SCHEDULES[name](num_stages, num_microbatches)
