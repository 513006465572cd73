"""Hand-written schedules: a text and a CSV form of per-rank action lists.

Text: one line per rank, ``rank <r>:`` (or ``<r>:``) then its actions separated by spaces
or commas; blank lines and ``#`` comments are ignored::

    # 1F1B, 2 ranks, 2 microbatches
    rank 0: 0F0 0F1 0B0 0B1
    rank 1: 1F0 1B0 1F1 1B1

CSV: one row per rank, in rank order, one action per cell; empty cells are skipped.

Lists may hold only F/B/W (``lower`` then adds the messages) or be fully lowered, with
SEND_F/RECV_F/SEND_B/RECV_B written out; either way ``CustomSchedule`` checks them and
dry-runs them once, so a schedule that would deadlock is refused before it runs.
"""

from __future__ import annotations

import csv
import io
import os
import re
from typing import Mapping, Sequence

from tandem.pipeline.ir import Action, ScheduleError
from tandem.pipeline.lower import _check_compute, validate_lowered
from tandem.pipeline.schedules import Schedule
from tandem.pipeline.simulate import simulate

__all__ = ["CustomSchedule", "parse_schedule", "format_schedule", "parse_csv", "format_csv"]

_RANK_RE = re.compile(r"\s*(?:rank\s*)?(\d+)\s*:(.*)", re.IGNORECASE)


def _parse_cell(token: str, where: str) -> Action:
    try:
        return Action.parse(token)
    except ValueError as e:
        raise ScheduleError(f"{where}: {e}") from None


def parse_schedule(text: str) -> dict[int, list[Action]]:
    """Parse the text form (see the module docstring) into ``{rank: [Action]}``."""
    out: dict[int, list[Action]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0]
        if not line.strip():
            continue
        match = _RANK_RE.fullmatch(line)
        if match is None:
            raise ScheduleError(f"line {lineno}: expected 'rank <r>: <actions>', got {line!r}")
        rank = int(match[1])
        if rank in out:
            raise ScheduleError(f"line {lineno}: rank {rank} is listed twice")
        out[rank] = [_parse_cell(tok, f"line {lineno}")
                     for tok in re.split(r"[\s,]+", match[2].strip()) if tok]
    if not out:
        raise ScheduleError("the text holds no 'rank <r>: ...' line")
    return dict(sorted(out.items()))


def format_schedule(actions: Mapping[int, Sequence[Action]]) -> str:
    """The text form of ``{rank: [Action]}``; ``parse_schedule`` reads it back."""
    return "".join(f"rank {r}: {' '.join(map(str, actions[r]))}\n" for r in sorted(actions))


def parse_csv(text: str) -> dict[int, list[Action]]:
    """Parse the CSV form: row r is rank r, one action per cell, empty cells (and blank
    rows at the end) skipped."""
    rows = list(csv.reader(io.StringIO(text)))
    while rows and not any(cell.strip() for cell in rows[-1]):
        rows.pop()
    out = {}
    for r, row in enumerate(rows):
        out[r] = [_parse_cell(cell, f"row {r + 1} (rank {r}) column {c + 1}")
                  for c, cell in enumerate(row) if cell.strip()]
    if not out:
        raise ScheduleError("the CSV holds no row")
    return out


def format_csv(actions: Mapping[int, Sequence[Action]]) -> str:
    """The CSV form of ``{rank: [Action]}``, rows padded to one width with empty cells."""
    if not actions:
        raise ScheduleError("format_csv: no rank to write")
    width = max(len(lst) for lst in actions.values())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in sorted(actions):
        cells = [str(a) for a in actions[r]]
        writer.writerow(cells + [""] * (width - len(cells)))
    return buf.getvalue()


class CustomSchedule(Schedule):
    """A schedule given as ``{rank: [Action or "1F3"]}``, checked and dry-run on creation.

    The layout (which rank holds each stage) and ``num_microbatches`` are read from the
    lists; ``split_backward`` is True when they hold W. Raises ``ScheduleError`` for
    malformed lists and ``DeadlockError`` (naming each rank's blocked step) for lists that
    cannot finish.
    """

    def __init__(self, actions: Mapping[int, Sequence[Action | str]], *, name: str = "custom"):
        if not isinstance(actions, Mapping):
            raise TypeError(f"expected {{rank: [Action]}}, got {type(actions).__name__}")
        lists = {r: [a if isinstance(a, Action) else _parse_cell(a, f"rank {r} step {i}")
                     for i, a in enumerate(lst)] for r, lst in actions.items()}
        lowered = any(not a.kind.is_compute for lst in lists.values() for a in lst)
        summary = validate_lowered(lists) if lowered else _check_compute(lists)
        super().__init__(summary.layout.num_ranks, summary.num_microbatches,
                         virtual_stages=summary.layout.virtual_stages)
        self.name = name
        self.split_backward = summary.split_backward
        self._layout = summary.layout
        self._lists = {r: lists[r] for r in sorted(lists)}
        self._lowered = lowered
        simulate(self)  # refuse, now, lists that cannot finish

    @classmethod
    def from_text(cls, text: str, *, name: str = "custom") -> "CustomSchedule":
        return cls(parse_schedule(text), name=name)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, *, name: str | None = None) -> "CustomSchedule":
        with open(path, newline="") as f:
            actions = parse_csv(f.read())
        return cls(actions, name=name or os.path.splitext(os.path.basename(path))[0])

    @property
    def layout(self):
        return self._layout

    def _rank_actions(self, rank: int) -> list[Action]:
        return [a for a in self._lists[rank] if a.kind.is_compute]

    def _lowered_as_written(self) -> dict[int, list[Action]] | None:
        return {r: list(lst) for r, lst in self._lists.items()} if self._lowered else None

    def __repr__(self) -> str:
        return (f"CustomSchedule({self.name!r}, num_ranks={self.num_ranks}, "
                f"num_microbatches={self.num_microbatches}, "
                f"virtual_stages={self.virtual_stages})")
