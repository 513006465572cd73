"""Pictures of pipeline schedules: planned (simulated) or measured.

The classic diagram: one row per rank (or per stage), time to the right, one coloured block
per F / B / W labelled with its microbatch; idle time shows as the grey band between
blocks. With several stages per rank, later stages (model chunks) of a rank are drawn in
lighter shades. matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

import pathlib
from typing import Iterable, Mapping

from tandem.pipeline.ir import ActionKind, TimelineRecord
from tandem.pipeline.schedules import Schedule
from tandem.pipeline.simulate import CostsLike, SimulationResult, bubble_fraction, simulate

__all__ = ["render"]

_COLOURS = {ActionKind.F: "#4E79A7", ActionKind.B: "#F28E2B", ActionKind.W: "#59A14F"}
_FORMATS = (".svg", ".png")


def render(source, path, *, costs: CostsLike = None, title: str | None = None,
           rows: str = "rank") -> pathlib.Path:
    """Draw ``source`` to ``path`` (.svg or .png, by extension); return the path.

    ``source``: a ``Schedule`` or action lists (dry-run with ``costs``, unit by default), a
    ``SimulationResult``, or a measured timeline: records ``(rank, stage, kind, microbatch,
    start_s, end_s)`` (``TimelineRecord`` or plain tuples; kind an ``ActionKind`` or its
    name). Sends and receives in a timeline are not drawn. ``rows``: "rank" (one row per
    rank, its stages shaded) or "stage" (one row per stage).
    """
    path = pathlib.Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise ValueError(f"render writes {' or '.join(_FORMATS)} files (by extension), "
                         f"got {str(path)!r}")
    if rows not in ("rank", "stage"):
        raise ValueError(f"rows must be 'rank' or 'stage', got {rows!r}")
    records, auto_title, unit = _timeline(source, costs)
    _draw(records, path, title if title is not None else auto_title, rows, unit)
    return path


def _timeline(source, costs) -> tuple[list[TimelineRecord], str, str]:
    if isinstance(source, (Schedule, Mapping)):
        result = simulate(source, costs)
        name = ""
        if isinstance(source, Schedule):
            v = f" v={source.virtual_stages}" if source.virtual_stages > 1 else ""
            name = (f"{getattr(source, 'name', type(source).__name__)}: "
                    f"p={source.num_ranks} m={source.num_microbatches}{v}, ")
        records = list(result.timeline)
        return records, f"{name}bubble {result.bubble_fraction:.1%}", "time"
    if isinstance(source, SimulationResult):
        records = list(source.timeline)
        return records, f"bubble {source.bubble_fraction:.1%}", "time"
    if isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        records = [_record(i, rec) for i, rec in enumerate(source)]
        if not any(rec.kind.is_compute for rec in records):
            raise ValueError("the timeline holds no F, B or W record to draw")
        return records, f"measured, bubble {bubble_fraction(records):.1%}", "time (s)"
    raise TypeError("render draws a Schedule, action lists, a SimulationResult or a timeline "
                    f"of (rank, stage, kind, microbatch, start_s, end_s); got "
                    f"{type(source).__name__}")


def _record(i: int, rec) -> TimelineRecord:
    try:
        rank, stage, kind, microbatch, start, end = rec
        kind = kind if isinstance(kind, ActionKind) else ActionKind(str(kind))
        out = TimelineRecord(int(rank), int(stage), kind, int(microbatch), float(start),
                             float(end))
    except (TypeError, ValueError) as e:
        raise ValueError(f"timeline record {i} ({rec!r}) is not (rank, stage, kind, "
                         f"microbatch, start_s, end_s): {e}") from None
    if out.end_s < out.start_s:
        raise ValueError(f"timeline record {i} ({rec!r}) ends before it starts")
    return out


def _shade(colour: str, chunk: int, chunks: int) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    mix = 0.5 * chunk / max(chunks - 1, 1)  # later chunks up to halfway to white
    return tuple(c + (1.0 - c) * mix for c in to_rgb(colour))


def _draw(records: list[TimelineRecord], path: pathlib.Path, title: str, rows: str,
          unit: str) -> None:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    blocks = [rec for rec in records if rec.kind.is_compute]
    t0 = min(rec.start_s for rec in blocks)
    t1 = max(rec.end_s for rec in blocks)
    span = t1 - t0 or 1.0
    stages_of: dict[int, list[int]] = {}
    for rec in blocks:
        stages_of.setdefault(rec.rank, [])
        if rec.stage not in stages_of[rec.rank]:
            stages_of[rec.rank].append(rec.stage)
    for stages in stages_of.values():
        stages.sort()
    chunks = max(len(s) for s in stages_of.values())
    if rows == "rank":
        keys = sorted(stages_of)
        labels = [f"rank {r}" + (f" (stages {', '.join(map(str, stages_of[r]))})"
                                 if chunks > 1 else "") for r in keys]
    else:
        keys = sorted({rec.stage for rec in blocks})
        owner = {s: r for r, stages in stages_of.items() for s in stages}
        labels = [f"stage {s} (rank {owner[s]})" for s in keys]
    row = {k: i for i, k in enumerate(keys)}
    per_row = max(sum(1 for rec in blocks if (rec.rank if rows == "rank" else rec.stage) == k)
                  for k in keys)
    width = min(max(6.0, 2.5 + 0.3 * per_row), 24.0)
    fontsize = 8
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "tandem"}):
        fig = Figure(figsize=(width, 1.3 + 0.45 * len(keys)))
        ax = fig.add_subplot()
        points_per_unit = (width - 2.5) * 72 / span  # rough width of the plot area
        for key, y in row.items():
            ax.add_patch(Rectangle((0, y - 0.4), span, 0.8, color="#EBEBEB", lw=0))
        for rec in blocks:
            y = row[rec.rank if rows == "rank" else rec.stage]
            chunk = stages_of[rec.rank].index(rec.stage)
            face = _shade(_COLOURS[rec.kind], chunk, chunks)
            ax.add_patch(Rectangle((rec.start_s - t0, y - 0.4), rec.end_s - rec.start_s, 0.8,
                                   facecolor=face, edgecolor="white", lw=0.6))
            label = str(rec.microbatch)
            if (rec.end_s - rec.start_s) * points_per_unit >= 0.7 * fontsize * len(label):
                luminance = 0.299 * face[0] + 0.587 * face[1] + 0.114 * face[2]
                ax.text((rec.start_s + rec.end_s) / 2 - t0, y, label, ha="center",
                        va="center", fontsize=fontsize,
                        color="black" if luminance > 0.6 else "white")
        ax.set_xlim(0, span)
        ax.set_ylim(len(keys) - 0.5, -0.5)
        ax.set_yticks(range(len(keys)), labels)
        ax.set_xlabel(unit)
        ax.set_title(title, fontsize=10)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        has_w = any(rec.kind is ActionKind.W for rec in blocks)
        legend = [Patch(color=_COLOURS[ActionKind.F], label="F"),
                  Patch(color=_COLOURS[ActionKind.B],
                        label="B (input grad)" if has_w else "B (full backward)")]
        if has_w:
            legend.append(Patch(color=_COLOURS[ActionKind.W], label="W (weight grad)"))
        if chunks > 1:
            legend.append(Patch(color=_shade(_COLOURS[ActionKind.F], chunks - 1, chunks),
                                label="lighter: later stages of a rank"))
        legend.append(Patch(color="#EBEBEB", label="idle"))
        ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  fontsize=fontsize, frameon=False)
        fig.tight_layout()
        fig.savefig(path, format=path.suffix[1:].lower(), dpi=110,
                    metadata={"Date": None} if path.suffix.lower() == ".svg" else None)
