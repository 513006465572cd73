"""The actions of one stage on its rank: F, B, W and the stage's sends and receives.

Per microbatch the stage keeps its input (a leaf that requires grad, so B yields the input
gradient), its output (or, on the last stage, the scaled loss) and, between a split B and
W, the output gradient. Stages on the same rank hand data over directly, without messages.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tandem.nn.wgrad import defer_weight_grads, flush
from tandem.pipeline._transport import PipelineError
from tandem.pipeline.ir import Action, ActionKind

K = ActionKind


def _as_leaf(x):
    if isinstance(x, Tensor) and x.is_floating_point() and torch.is_grad_enabled():
        return x.detach().requires_grad_(True)
    return x


class StageExec:
    def __init__(self, stage: int, module: nn.Module, runner):
        self.stage, self.module, self.runner = stage, module, runner
        self.last = stage == runner.layout.num_stages - 1
        self._reset()

    def _reset(self):
        self.inputs, self.outputs, self.losses = {}, {}, {}
        self.grad_in, self.pending_w, self.ready = {}, {}, {}
        self.chunks_in = self.chunks_tg = None
        self.loss_total = None

    def begin(self, train: bool, m: int, chunks_in, chunks_tg) -> None:
        self._reset()
        self.train, self.m = train, m
        self.chunks_in, self.chunks_tg = chunks_in, chunks_tg
        if self.last and train and chunks_tg is None:
            raise TypeError("targets must be given on the last stage")
        if self.stage == 0 and chunks_in is None:
            raise TypeError("inputs must be given on the first stage")

    def end(self) -> None:
        self._reset()

    # --- data in ----------------------------------------------------------------------------
    def _neighbour(self, stage: int):
        """The StageExec of ``stage`` when it lives on this rank, else None."""
        return self.runner.stages.get(stage)

    def fetch(self, a: Action) -> None:
        """Wait for the data that the compute action ``a`` needs (kept apart from the
        compute, so that the timeline shows waiting as idle time)."""
        if a.kind is K.F and self.stage > 0:
            self.ready[K.F, a.microbatch] = self._input(a.microbatch)
        elif a.kind is K.B and not self.last:
            self.ready[K.B, a.microbatch] = self._output_grad(a.microbatch)

    def _input(self, mb: int):
        if (K.F, mb) in self.ready:
            return self.ready.pop((K.F, mb))
        if self.stage == 0:
            return self.chunks_in[mb]
        prev = self._neighbour(self.stage - 1)
        if prev is not None:  # inference: handed over, no longer kept
            return (prev.outputs[mb] if self.train else prev.outputs.pop(mb)).detach()
        return self.runner.p2p.take((K.RECV_F, self.stage, mb))

    def _output_grad(self, mb: int):
        if (K.B, mb) in self.ready:
            return self.ready.pop((K.B, mb))
        if self.last:
            return None
        nxt = self._neighbour(self.stage + 1)
        if nxt is not None:
            return nxt.grad_in.pop(mb)
        return self.runner.p2p.take((K.RECV_B, self.stage, mb))

    def post_recv(self, a: Action) -> None:
        key = (a.kind, a.stage, a.microbatch)
        self.runner.p2p.post_recv(key, forward=a.kind is K.RECV_F, what=str(a))

    # --- compute ----------------------------------------------------------------------------
    def forward(self, mb: int) -> None:
        runner = self.runner
        if runner.p2p is not None:
            runner.p2p.link.progress()  # dynamic shapes: data behind a landed header goes out
        x = _as_leaf(self._input(mb))
        y = self.module(x)
        if self.last and self.train:
            loss = runner.loss_fn(y, self.chunks_tg[mb])
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor, got {loss!r}")
            self.losses[mb] = loss.reshape(()) / self.m  # mean over microbatches
            detached = self.losses[mb].detach()
            self.loss_total = detached if self.loss_total is None else self.loss_total + detached
        else:
            if not isinstance(y, Tensor):
                raise TypeError(f"a stage must return one Tensor, got {type(y).__name__}")
            self.outputs[mb] = y
        if self.train:
            self.inputs[mb] = x

    def _roots(self, mb: int):
        """(output, its gradient) that start the backward of ``mb``."""
        if self.last:
            scale = self.runner.loss_scale  # fp16: the optimizer's loss scale
            return (self.losses[mb] * scale if scale != 1.0 else self.losses[mb]), None
        return self.outputs[mb], self._output_grad(mb)

    def backward(self, mb: int) -> None:
        """Full backward: input gradient and weight gradients together."""
        out, grad = self._roots(mb)
        x = self.inputs.pop(mb)
        torch.autograd.backward(out, grad)
        self._keep_input_grad(mb, x.grad if isinstance(x, Tensor) and x.requires_grad else None)
        self.outputs.pop(mb, None)
        self.losses.pop(mb, None)

    def backward_input(self, mb: int) -> None:
        """B of a split backward: the stage input's gradient, and the gradients of parameters
        outside tandem's linear layers; the linear layers' weight-gradient GEMMs are deferred
        to W (tandem.nn.wgrad), so B + W costs one backward."""
        out, grad = self._roots(mb)
        x = self.inputs.pop(mb)
        bucket = self.pending_w[mb] = []
        with defer_weight_grads(bucket):
            torch.autograd.backward(out, grad)
        self._keep_input_grad(mb, x.grad if isinstance(x, Tensor) and x.requires_grad else None)
        self.outputs.pop(mb, None)
        self.losses.pop(mb, None)

    def backward_weight(self, mb: int, after=None) -> None:
        """W of a split backward: the deferred parameter-gradient work, accumulated into
        ``param.grad`` (``after(piece)`` after each piece)."""
        flush(self.pending_w.pop(mb), after)

    def _keep_input_grad(self, mb: int, gx) -> None:
        if self.stage == 0:
            return
        if gx is None:
            raise PipelineError(f"stage {self.stage} ({self.runner.who}): microbatch {mb} produced no "
                                "gradient for the stage input (is the input used by the stage?)")
        self.grad_in[mb] = gx

    # --- data out ---------------------------------------------------------------------------
    def send(self, a: Action) -> None:
        forward = a.kind is K.SEND_F
        if not forward:
            t = self.grad_in.pop(a.microbatch)
        else:  # training keeps the output for B; inference is done with it once sent
            t = self.outputs[a.microbatch] if self.train else self.outputs.pop(a.microbatch)
        self.runner.p2p.send(t, forward=forward, what=str(a))

    # --- results ------------------------------------------------------------------------------
    def outputs_in_order(self) -> list:
        return [self.outputs[mb] for mb in sorted(self.outputs)]

    def loss_sum(self):
        """The mean loss over the microbatches of this call (None without targets)."""
        return self.loss_total

    def __repr__(self) -> str:
        return f"StageExec(stage {self.stage})"
