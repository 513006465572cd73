"""PipelineRunner: execute this rank's lowered action list for one training step.

    RECV_F / RECV_B   post the receive at once (the data lands while other actions run)
    F                 forward of one microbatch; the last stage also computes its loss
    B                 backward: the input gradient only when the schedule has W, else full
    W                 weight gradient (autograd restricted to the stage's parameters)
    SEND_F / SEND_B   start the send and move on; sends are waited for at the end

Gradients accumulate in ``param.grad`` over the microbatches (each microbatch loss is
scaled by 1/m, so they sum to the gradient of the mean loss). After the last action:
tied weights (a tied embedding's copy on the last stage) exchange and sum their gradients,
DP replicas average theirs (every other gradient's dp all-reduce started during the stage's
last backward, bucket by bucket, as soon as autograd finished the bucket), and the mean
loss is all-reduced so that every rank of the pipeline returns it. Every wait is bounded by ``timeout``; a stage that raises posts its
error on the job's store and every other rank stops with that error (PipelineError naming
the stage, its rank and the action). A runner that failed refuses further calls with the
same error: its peers have stopped too.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from tandem.pipeline._agree import AGREE_TIMEOUT_S, agree, setting
from tandem.pipeline._stage_exec import StageExec
from tandem.pipeline._transport import ErrorBoard, PipelineError, StageTraffic, fail_every_rank, wait
from tandem.pipeline.ir import Action, ActionKind, TimelineRecord
from tandem.pipeline.lower import lower
from tandem.pipeline.schedules import Schedule

__all__ = ["PipelineRunner", "PipelineError", "chrome_trace"]

K = ActionKind


def chrome_trace(timeline: Sequence[TimelineRecord]) -> dict:
    """Chrome-trace JSON (chrome://tracing, Perfetto) of timeline records: one process per
    rank, one thread per stage, one complete event per action, times in microseconds."""
    if not timeline:
        return {"traceEvents": []}
    t0 = min(rec.start_s for rec in timeline)
    events = [{"name": str(rec.action), "cat": rec.kind.value, "ph": "X", "pid": rec.rank,
               "tid": rec.stage, "ts": (rec.start_s - t0) * 1e6,
               "dur": (rec.end_s - rec.start_s) * 1e6,
               "args": {"microbatch": rec.microbatch}} for rec in timeline]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _build_schedule(schedule, pp: int, m: int) -> Schedule:
    if isinstance(schedule, Schedule):
        if schedule.num_ranks != pp:
            raise ValueError(f"PipelineRunner: the schedule has {schedule.num_ranks} ranks, the "
                             f"mesh has pp={pp}")
        if schedule.num_microbatches != m:
            raise ValueError(f"PipelineRunner: num_microbatches={m}, but the schedule was made "
                             f"for {schedule.num_microbatches}")
        return schedule
    if callable(schedule):  # a Schedule class or a factory (num_ranks, num_microbatches)
        built = schedule(pp, m)
        if not isinstance(built, Schedule):
            raise TypeError(f"PipelineRunner: schedule({pp}, {m}) returned {built!r}, not a Schedule")
        return built
    raise TypeError(f"PipelineRunner: schedule must be a Schedule or a Schedule class, got {schedule!r}")


def _neighbours(layout, rank: int) -> tuple[Optional[int], Optional[int]]:
    """The ranks this rank receives activations from and sends them to (None: none): rank
    - 1 and rank + 1 (mod pp), the chain or ring that StageLink's forks are laid out for."""
    mine, pp = layout.stages_of(rank), layout.num_ranks
    prevs = {layout.rank_of(s - 1) for s in mine if s > 0} - {rank}
    nexts = {layout.rank_of(s + 1) for s in mine if s + 1 < layout.num_stages} - {rank}
    if len(prevs) > 1 or len(nexts) > 1 or prevs - {(rank - 1) % pp} or nexts - {(rank + 1) % pp}:
        raise ValueError(f"PipelineRunner: pipeline rank {rank} exchanges activations with ranks "
                         f"{sorted(prevs)} (before it) and {sorted(nexts)} (after it); the runtime "
                         f"needs them from rank {(rank - 1) % pp} and to rank {(rank + 1) % pp} at "
                         "most, as looped layouts have (stage s on rank s % pp)")
    return next(iter(prevs), None), next(iter(nexts), None)


def _tied_weights(stages) -> list:
    """(pair of stages, this stage, the other, name, parameter) of each tied weight of
    ``stages`` ({stage: StageExec}), in the order of the pairs (the same order on both ends)."""
    exchanges = []
    for ex in stages.values():
        for name, (param, other) in getattr(ex.module, "tied", {}).items():
            exchanges.append(((min(ex.stage, other), max(ex.stage, other)), ex.stage, other, name, param))
    exchanges.sort(key=lambda e: e[0])
    return exchanges


def _final_gradient_actions(actions) -> tuple[dict, dict]:
    """For each stage, the index of its last B, and of its last B or W (its gradients are
    final after that one)."""
    last_b, done = {}, {}
    for i, a in enumerate(actions):
        if a.kind is K.B:
            last_b[a.stage] = i
        if a.kind in (K.B, K.W):
            done[a.stage] = i
    return last_b, done


class PipelineRunner:
    """Runs pipeline steps of this rank's stage(s) with a schedule.

    ``stage_module``: this rank's stage, or a list of its stages in order (virtual stages,
    ``schedule.layout.stages_of(pp_rank)``); a ``StageModule`` from ``split`` carries its
    stage index and tied weights. ``mesh``: the tp x pp x dp mesh (default: the default
    mesh, else one process). ``schedule``: a Schedule instance or class. ``loss_fn(output,
    target) -> scalar`` on the last stage. ``shapes``: "static" (every activation between
    stages keeps the shape and dtype of the first one, likewise every gradient: a header
    travels once, receive buffers are reused; another shape raises on both ends) or
    "dynamic" (a header before every message). ``timeout``: seconds any wait may take.
    ``dp_bucket_bytes``: with dp > 1, the size of the gradient buckets whose dp all-reduce
    starts during the stage's last backward, as soon as autograd finished each bucket.
    ``optimizer``: a ``tandem.optim`` MixedPrecisionOptimizer or DistributedOptimizer over
    the stages' parameters: gradients then accumulate in its fp32 buffers, its buckets
    are all-reduced (reduce-scattered) over dp during the last backward (not inside its
    ``no_sync()``: gradient accumulation reduces with the last micro-step), and each
    microbatch's loss is multiplied by its loss scale before the backward (fp16).

    Messages travel over a C++ ``tandem.comm.StageLink`` (forward and backward traffic on
    their own forks), receives posted as soon as the action list says.
    """

    def __init__(self, stage_module, *, mesh=None, schedule, loss_fn: Callable,
                 num_microbatches: int, shapes: str = "static", timeout: float = 300.0,
                 dp_bucket_bytes: int = 32 << 20, optimizer=None):
        from tandem.mesh import Mesh, get_mesh

        self.mesh = mesh if mesh is not None else (get_mesh() or Mesh.single())
        # first, before checks that may fail on one rank only: every rank takes one key per runner
        self.board = ErrorBoard(self.mesh.board_key("runner"))  # every rank of the mesh reads it
        self.rank = self.mesh.pp_rank
        self.who = f"pipeline rank {self.rank} (global rank {self.mesh.rank})"
        self.p2p, self.reducer, self.optimizer, self._closed = None, None, None, False
        # this rank's checks, then the agreement: a refusal or a setting that differs between
        # ranks fails every rank here, before any message or link
        names = ("num_microbatches", "schedule", "shapes", "timeout")
        refusal, settings, agree_timeout = None, {name: (0, "") for name in names}, AGREE_TIMEOUT_S
        try:
            modules = self._configure(stage_module, schedule, loss_fn, num_microbatches, shapes, timeout,
                                      dp_bucket_bytes, optimizer)
            lists = ";".join(" ".join(map(str, lst)) for _, lst in sorted(self._all_lowered.items()))
            given = (num_microbatches, f"{self.schedule!r}: {lists}", shapes, float(timeout))
            shown = (num_microbatches, self.schedule, shapes, float(timeout))  # not every list
            settings = {name: (setting(v), repr(s)) for name, v, s in zip(names, given, shown)}
            agree_timeout = timeout
        except (ValueError, TypeError) as e:
            refusal = e
        agree(self.mesh, ("pp", "tp", "dp"), self.board, refusal, settings, agree_timeout, self.who,
              "PipelineRunner")
        mine = self.layout.stages_of(self.rank)
        if self.mesh.pp > 1:  # collective over the pp group: every pipeline rank builds its link here
            prev_rank, next_rank = _neighbours(self.layout, self.rank)
            try:
                self.p2p = StageTraffic(self.mesh.pp_comm, prev_rank, next_rank, board=self.board,
                                        timeout=timeout, shapes=shapes, who=self.who)
            except RuntimeError as e:
                self._fail(f"{self.who}: building the StageLink failed: {e}", e)
        self.stages = {s: StageExec(s, mod, self) for s, mod in zip(mine, modules)}
        self._tied = _tied_weights(self.stages)
        tied = {id(param) for *_, param in self._tied}
        groups = [[p for p in ex.module.parameters() if id(p) not in tied] for ex in self.stages.values()]
        if self.optimizer is not None:
            if self.mesh.dp > 1:  # its buckets; the tied weights' are final only at the end
                self.reducer = self.optimizer.grad_reducer(groups)
        elif self.mesh.dp > 1:  # dp all-reduce of each stage's buckets during its last backward
            from tandem.dp import OverlappedGradReducer

            self.reducer = OverlappedGradReducer(groups, self.mesh, bucket_bytes=dp_bucket_bytes)
        if self.reducer is not None:
            self._group = {s: i for i, s in enumerate(self.stages)}
            self._last_b, self._done_at = _final_gradient_actions(self.lowered)
        self.timeline: list[TimelineRecord] = []
        self._events: list = []

    def _configure(self, stage_module, schedule, loss_fn, num_microbatches, shapes, timeout,
                   dp_bucket_bytes, optimizer) -> list:
        """This rank's checks (ValueError / TypeError naming what is wrong) and settings;
        returns its stage modules in order."""
        pp, rank = self.mesh.pp, self.rank
        if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) \
                or num_microbatches < 1:
            raise ValueError(f"PipelineRunner: num_microbatches must be an int >= 1, got "
                             f"{num_microbatches!r}")
        if shapes not in ("static", "dynamic"):
            raise ValueError(f'PipelineRunner: shapes must be "static" or "dynamic", got {shapes!r}')
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"PipelineRunner: timeout must be a finite number of seconds > 0, "
                             f"got {timeout!r}")
        if isinstance(dp_bucket_bytes, bool) or not isinstance(dp_bucket_bytes, int) or dp_bucket_bytes < 1:
            raise ValueError(f"PipelineRunner: dp_bucket_bytes must be an int >= 1, got {dp_bucket_bytes!r}")
        if not callable(loss_fn):
            raise TypeError(f"PipelineRunner: loss_fn must be callable, got {loss_fn!r}")
        from tandem.optim import MixedPrecisionOptimizer

        if optimizer is not None and not isinstance(optimizer, MixedPrecisionOptimizer):
            raise TypeError("PipelineRunner: optimizer must be a tandem.optim MixedPrecisionOptimizer or "
                            f"DistributedOptimizer (a torch optimizer needs none: step it after the runner), "
                            f"got {type(optimizer).__name__}")
        if optimizer is not None and optimizer.mesh is not self.mesh:
            raise ValueError("PipelineRunner: the optimizer was built on another mesh than the runner's")
        self.optimizer = optimizer
        self.schedule = _build_schedule(schedule, pp, num_microbatches)
        self.layout = self.schedule.layout
        self.num_microbatches, self.loss_fn, self.timeout = num_microbatches, loss_fn, timeout
        self.shapes = shapes
        modules = list(stage_module) if isinstance(stage_module, (list, tuple)) else [stage_module]
        mine = self.layout.stages_of(rank)
        if len(modules) != len(mine):
            raise ValueError(f"PipelineRunner: pipeline rank {rank} holds stages {list(mine)} under "
                             f"{self.schedule!r}, but {len(modules)} stage module(s) were given")
        for s, mod in zip(mine, modules):
            if not isinstance(mod, nn.Module):
                raise TypeError(f"PipelineRunner: stage {s} is not an nn.Module: {mod!r}")
            given = getattr(mod, "stage", s)
            if given != s or getattr(mod, "num_stages", self.layout.num_stages) != self.layout.num_stages:
                raise ValueError(f"PipelineRunner: pipeline rank {rank} runs stage {s} of "
                                 f"{self.layout.num_stages}, but was given stage {given} of "
                                 f"{getattr(mod, 'num_stages', '?')}")
        if optimizer is not None:
            missing = [p for mod in modules for p in mod.parameters()
                       if p.requires_grad and id(p) not in optimizer.layout.where]
            if missing:
                raise ValueError(f"PipelineRunner: {len(missing)} parameter(s) of this rank's stages (first of "
                                 f"shape {tuple(missing[0].shape)}) are not managed by the optimizer; build it "
                                 "over every parameter of the stages")
        if pp > 1:
            _neighbours(self.layout, rank)  # a layout the runtime cannot run: refused here
        self._all_lowered = lower(self.schedule)  # every rank's list: what the ranks agree on
        self.lowered = self._all_lowered[rank]
        self.device = self.mesh.device
        return modules

    # --- public ---------------------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        """What each microbatch loss is multiplied by before its backward (the optimizer's
        loss scale; 1.0 without one)."""
        return self.optimizer.loss_scale if self.optimizer is not None else 1.0

    @property
    def stage_modules(self) -> list[nn.Module]:
        return [ex.module for ex in self.stages.values()]

    def parameters(self):
        return itertools.chain.from_iterable(m.parameters() for m in self.stage_modules)

    def step(self, inputs: Optional[Tensor] = None, targets: Optional[Tensor] = None) -> Tensor:
        """One training step over ``num_microbatches`` microbatches; returns the mean loss
        on every rank. ``inputs`` are needed on the first stage, ``targets`` on the last.
        Gradients accumulate into ``param.grad`` (tied weights included) until zeroed. On
        CUDA it returns once the step's communication completed on the GPU (a host wait), so
        that a transfer that failed raises here, before the optimizer steps on its result."""
        with self._failing_every_rank():
            kept = self._set_aside_tied_grads()
            try:
                self._run(inputs, targets, train=True)
                self._sum_tied_grads(kept)
                self._all_reduce_dp()
                loss = self._share_loss()
                self._check_delivered()
            except BaseException:
                self._restore_tied_grads(kept)  # what was accumulated before the failed step
                raise
            self._end()
        return loss

    @torch.no_grad()
    def forward(self, inputs: Optional[Tensor] = None) -> Optional[Tensor]:
        """Inference: the last stage's output for ``inputs`` (concatenated over the
        microbatches) on the last stage's rank, None on the others."""
        with self._failing_every_rank():
            self._run(inputs, None, train=False)
            last = self.stages.get(self.layout.num_stages - 1)
            out = torch.cat(last.outputs_in_order(), dim=0) if last is not None else None
            self._share_loss()  # CPU: also a final check that no stage failed
            self._check_delivered()
            self._end()
        return out

    __call__ = forward

    def chrome_trace(self) -> dict:
        """This rank's last timeline as Chrome-trace JSON (CUDA: its events resolved first)."""
        return chrome_trace(self.resolve_timeline())

    def save_chrome_trace(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)

    # --- one pass over the action list ------------------------------------------------------
    def _fail(self, message: str, cause: BaseException) -> None:
        self.board.post(message)
        raise PipelineError(message) from cause

    @contextlib.contextmanager
    def _failing_every_rank(self):
        """A call of this runner: refused once closed. Its host waits for collectives (TP
        inside a stage, DP) also end when a peer posted a failure, and after ``timeout``.
        Whatever fails in it (a stage, a wait, a peer's failure) is posted for every rank
        (the board keeps the first) and raised as a PipelineError; this rank's link and the
        mesh's communicators are aborted, since operations of the failed call may still be
        posted on them (later calls on them raise instead of matching those); the runner
        refuses later calls with that error."""
        from tandem import _C

        if self._closed:
            raise PipelineError(f"{self.who}: the runner was closed")
        self.board.check(force=True)  # a failed runner (or a peer's failure) refuses with that error
        self.mesh.raise_if_aborted()  # another call on this mesh failed (this runner may not know)
        try:
            with _C._WaitWatch(self.board._impl, float(self.timeout)):
                yield
        except BaseException as e:
            self._end()  # drop the failed call's activations and graphs
            error = fail_every_rank(e, self.who, self.board, self.mesh,
                                    self.p2p.link if self.p2p is not None else None)
            if error is e:
                raise
            raise error from e

    def _run(self, inputs, targets, *, train: bool) -> None:
        self.timeline, self._events = [], []
        m = self.num_microbatches
        try:
            chunks_in = self._chunks(inputs, "inputs") if 0 in self.stages else None
            last = self.layout.num_stages - 1
            chunks_tg = self._chunks(targets, "targets") if train and last in self.stages else None
            for ex in self.stages.values():
                ex.begin(train, m, chunks_in if ex.stage == 0 else None,
                         chunks_tg if ex.stage == last else None)
        except (ValueError, TypeError) as e:
            self._fail(f"{self.who}: step refused: {e}", e)
        if train and self._reducing():
            self.reducer.begin_step()
            for i, a in enumerate(self.lowered):
                self._execute_reducing(i, a)
        else:
            actions = self.lowered if train else [
                a for a in self.lowered if a.kind in (K.F, K.SEND_F, K.RECV_F)]
            for a in actions:
                self._execute(a)
        if self.p2p is not None:
            self.p2p.finish()

    def _execute_reducing(self, i: int, a: Action) -> None:
        """Execute action ``i`` and start the dp all-reduce of the gradient buckets that it
        made final: during the stage's last B through autograd's hooks when nothing is
        deferred; with split backwards, after the last B and each later W, every bucket that
        no deferred work still writes."""
        if a.kind not in (K.B, K.W) or i < self._last_b[a.stage]:
            self._execute(a)
            return
        try:
            self._reduce_around(i, a)
        except PipelineError:
            raise
        except Exception as e:  # the dp side of the action: fail every rank with it too
            self._fail(f"stage {a.stage} ({self.who}) failed starting dp all-reduces after {a}: "
                       f"{type(e).__name__}: {e}", e)

    def _reduce_around(self, i: int, a: Action) -> None:
        from tandem.nn.wgrad import pending_params

        group, reducer, ex = self._group[a.stage], self.reducer, self.stages[a.stage]
        split = self.schedule.split_backward
        if not split:  # the last backward: autograd's hooks tell
            reducer.arm(group)
            try:
                self._execute(a)
            finally:
                reducer.disarm(group)
        elif a.kind is K.B:  # the last B: what no W will still write is final
            self._execute(a)
            reducer.mark_final(group, pending_params(ex.pending_w.values()))
        else:  # a W after it: a parameter is final once its last deferred piece ran
            left = pending_params(ex.pending_w.values())

            def after(d):
                done = []
                for p in d.params:
                    left[id(p)] -= 1
                    if left[id(p)] == 0:
                        done.append(id(p))
                if done:
                    reducer.mark_ready(group, done)

            self._execute(a, after_w=after)
        if i == self._done_at[a.stage]:
            reducer.flush_group(group)

    def _chunks(self, t, name: str) -> list:
        m = self.num_microbatches
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor on this stage, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[0] % m:
            raise ValueError(f"{name} of shape {tuple(t.shape)}: the batch (dim 0) must be divisible "
                             f"by num_microbatches={m}")
        return list(t.chunk(m, dim=0))

    def _execute(self, a: Action, after_w=None) -> None:
        ex = self.stages[a.stage]
        try:
            if a.kind in (K.F, K.B):
                ex.fetch(a)  # waiting for data is idle time, not compute
            t0 = self._clock()
            if a.kind is K.F:
                ex.forward(a.microbatch)
            elif a.kind is K.B:
                ex.backward_input(a.microbatch) if self.schedule.split_backward \
                    else ex.backward(a.microbatch)
            elif a.kind is K.W:
                ex.backward_weight(a.microbatch, after_w)
            elif a.kind in (K.RECV_F, K.RECV_B):
                ex.post_recv(a)
            else:
                ex.send(a)
        except PipelineError:
            raise
        except Exception as e:
            self._fail(f"stage {a.stage} ({self.who}) failed in {a}: {type(e).__name__}: {e}", e)
        self._record(a, t0)

    # --- timeline ---------------------------------------------------------------------------
    def _clock(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _record(self, a: Action, start) -> None:
        end = self._clock()
        if isinstance(start, float):
            self.timeline.append(TimelineRecord(self.rank, a.stage, a.kind, a.microbatch, start, end))
        else:
            self._events.append((a, start, end))

    def resolve_timeline(self) -> list[TimelineRecord]:
        """Turn recorded CUDA events into timeline records (synchronizes them). Times are
        host perf_counter seconds, comparable between the ranks of one machine."""
        if self._events:
            # an anchor: an event recorded now, and the host time at which the GPU passed it
            # (synchronize returns then), so that the ranks of one machine line up
            anchor = torch.cuda.Event(enable_timing=True)
            anchor.record()
            anchor.synchronize()
            host = time.perf_counter()
            for a, s, e in self._events:
                t0 = host - s.elapsed_time(anchor) / 1e3
                t1 = host - e.elapsed_time(anchor) / 1e3
                self.timeline.append(TimelineRecord(self.rank, a.stage, a.kind, a.microbatch, t0, t1))
            self._events = []
        return self.timeline

    # --- after the last action ----------------------------------------------------------
    def _set_aside_tied_grads(self) -> list:
        """The tied weights' accumulated gradients (equal on both ends), set to None (a tandem
        optimizer's fp32 buffer: copied, then zeroed) so that the step's exchange sums this
        step's gradients alone."""
        kept = []
        for *_, param in self._tied:
            main = getattr(param, "main_grad", None)
            if main is not None:
                kept.append(main.clone())
                main.zero_()
            else:
                kept.append(param.grad)
                param.grad = None
        return kept

    def _restore_tied_grads(self, kept: list) -> None:
        for (*_, param), before in zip(self._tied, kept):
            main = getattr(param, "main_grad", None)
            if main is not None:
                main.copy_(before)
            else:
                param.grad = before

    @staticmethod
    def _this_step_grad(param):
        main = getattr(param, "main_grad", None)
        if main is not None:
            return main
        return param.grad if param.grad is not None else torch.zeros_like(param)

    @staticmethod
    def _store_grad(param, grad) -> None:
        main = getattr(param, "main_grad", None)
        if main is not None:
            main.copy_(grad)
        else:
            param.grad = grad

    def _sum_tied_grads(self, kept: list) -> None:
        """Sum each tied weight's gradient of this step with the other end's, then add what
        was accumulated before (``kept``): both ends hold the same bits."""
        local: dict = {}
        for (pair, stage, other, name, param), before in zip(self._tied, kept):
            grad = self._this_step_grad(param)
            peer = self.layout.rank_of(other)
            if peer == self.rank:  # both ends on this rank: sum once both are seen
                if pair in local:
                    other_param, other_grad, other_before = local.pop(pair)
                    total = grad + other_grad
                    self._store_grad(param, total if before is None else total + before)
                    self._store_grad(other_param, total.clone() if other_before is None else total + other_before)
                else:
                    local[pair] = (param, grad, before)
                continue
            # grad [shape of the tied weight] <-> the other end's, on the pp group's own tag
            theirs = torch.empty_like(grad)
            works = self.mesh.pp_comm.batch_p2p([("recv", theirs, peer), ("send", grad.contiguous(), peer)])
            for work in works:
                wait(work, f"{self.who}: tied gradient {name} with rank {peer}", self.board,
                     self.timeout, host=self.device.type != "cuda")  # CUDA: the stream waits
            # a + b == b + a in floating point: both ends hold the same sum
            total = grad + theirs if stage == pair[0] else theirs + grad
            self._store_grad(param, total if before is None else total + before)

    def _all_reduce_dp(self) -> None:
        """Average over dp: wait for the buckets started during the backward, then the tied
        weights (their gradients were summed between stages after the last action)."""
        if not self._reducing():
            return
        from tandem.dp import all_reduce_grads

        host = self.device.type != "cuda"
        self.reducer.finish(lambda work, what: wait(work, f"{self.who}: {what}", self.board,
                                                    self.timeout, host=host))
        if self.optimizer is None:  # the optimizer's buckets held the tied weights
            all_reduce_grads([param for *_, param in self._tied], self.mesh)

    def _reducing(self) -> bool:
        """Whether this step reduces gradients over dp: not inside the optimizer's
        ``no_sync()`` (the micro-steps of gradient accumulation but the last)."""
        return self.reducer is not None and (self.optimizer is None or self.optimizer.sync_grads)

    def _check_delivered(self) -> None:
        """The host check before the caller uses the result (steps its optimizer): on CUDA
        the call's waits only ordered streams, and a receive that the watchdog aborted (a
        peer died) leaves its buffer unfilled while the stream runs on. The host waits for
        the call's transfers and collectives and raises (failing every rank) if one failed.
        On CPU its waits were host waits already: this costs nothing."""
        if self.p2p is not None:
            self.p2p.link.synchronize(self.timeout)
        self.mesh.synchronize(self.timeout)

    def _share_loss(self) -> Tensor:
        last = self.stages.get(self.layout.num_stages - 1)
        loss = last.loss_sum() if last is not None else None
        out = torch.zeros((), dtype=torch.float32, device=self.device) if loss is None \
            else loss.detach().float().reshape(())
        host = self.device.type != "cuda"  # CUDA: the stream waits, the host runs ahead
        if self.mesh.pp > 1:
            out = out.reshape(1).contiguous()
            wait(self.mesh.pp_comm.all_reduce(out), f"{self.who}: loss all-reduce", self.board,
                 self.timeout, host=host)  # () summed over pp: only the last stage adds
            out = out.reshape(())
        if self.mesh.dp > 1:
            out = out.reshape(1).contiguous()
            wait(self.mesh.dp_comm.all_reduce(out), f"{self.who}: loss all-reduce over dp",
                 self.board, self.timeout, host=host)
            out = (out / self.mesh.dp).reshape(())
        return out

    def _end(self) -> None:
        for ex in self.stages.values():
            ex.end()

    def close(self) -> None:
        """Release what the runner holds beyond its modules: the dp reducer's gradient hooks
        and the StageLink's communicators (aborted: local, no peer waits). Later calls raise."""
        self._closed = True
        self._end()
        if self.reducer is not None:
            self.reducer.remove()
            self.reducer = None
        if self.optimizer is not None and self.optimizer.reducer is not None:
            self.optimizer.reducer = None
        if self.p2p is not None:
            self.p2p.link.abort()
            self.p2p = None
