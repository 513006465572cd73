"""Pipeline parallelism: a schedule IR, built-in schedules, lowering, a dry-run simulator
and schedule pictures.

A schedule is data: ``{rank: [Action]}``. Built-in schedules (``GPipe``, ``OneFOneB``,
``Interleaved1F1B``, ``ZeroBubbleH1``) or hand-written ones (``CustomSchedule``) give the
per-rank compute lists; ``lower`` adds matched sends and receives; ``simulate`` dry-runs the
result (deadlocks, timeline, bubble, in-flight microbatches); ``render`` draws it.
``split`` cuts a model's layers into stages, ``PipelineRunner`` runs training steps and
inference of a rank's stage(s) with a schedule, and ``generate`` decodes a GPT through the
pipeline with stage-local KV caches.
"""

from tandem.pipeline.custom import (CustomSchedule, format_csv, format_schedule, parse_csv,
                                    parse_schedule)
from tandem.pipeline.generate import generate, sharded_argmax
from tandem.pipeline.ir import (Action, ActionKind, DeadlockError, ScheduleError, StageLayout,
                                TimelineRecord)
from tandem.pipeline.lower import lower, validate_lowered
from tandem.pipeline.render import render
from tandem.pipeline.runtime import PipelineError, PipelineRunner, chrome_trace
from tandem.pipeline.schedules import (GPipe, Interleaved1F1B, OneFOneB, Schedule,
                                       ZeroBubbleH1)
from tandem.pipeline.simulate import Costs, SimulationResult, bubble_fraction, simulate
from tandem.pipeline.split import Partition, StageModule, TiedWeight, partition, split

__all__ = [
    "Action",
    "ActionKind",
    "StageLayout",
    "TimelineRecord",
    "ScheduleError",
    "DeadlockError",
    "Schedule",
    "GPipe",
    "OneFOneB",
    "Interleaved1F1B",
    "ZeroBubbleH1",
    "CustomSchedule",
    "parse_schedule",
    "format_schedule",
    "parse_csv",
    "format_csv",
    "lower",
    "validate_lowered",
    "Costs",
    "SimulationResult",
    "simulate",
    "bubble_fraction",
    "render",
    "split",
    "partition",
    "Partition",
    "StageModule",
    "TiedWeight",
    "PipelineRunner",
    "PipelineError",
    "chrome_trace",
    "generate",
    "sharded_argmax",
]
