"""MixedPrecisionOptimizer: fp32 master weights and fp32 gradient accumulation around any
torch optimizer, with dp all-reduce of gradient buckets and dynamic loss scaling for fp16.

Per parameter (of any dtype: fp32, bf16, fp16):

- ``param.main_grad``: an fp32 view into a flat bucket buffer. After every microbatch's
  backward the parameter's gradient is added to it and ``param.grad`` is freed (a
  post-accumulate-grad hook); tandem's deferred weight-gradient work (zero-bubble W)
  accumulates into it directly. So gradients accumulate across microbatches in fp32.
- an fp32 master copy, which the wrapped optimizer (``optimizer_class``, e.g.
  torch.optim.AdamW) updates; the parameter is then refreshed from it (cast to its dtype).

Step: reduce the buckets over dp (``PipelineRunner`` starts them during the last backward;
otherwise :meth:`step` does it), divide by the loss scale, agree over tp x pp x dp whether
any gradient is inf/nan (then skip the step and back the scale off), step the masters,
copy them into the parameters. ``tandem.optim.clip_grad_norm_(optimizer, ...)`` clips the
master gradients between the reduction and the step.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Union

import torch
from torch import Tensor, nn

from tandem.optim._layout import Layout
from tandem.optim.scaler import DynamicLossScaler

__all__ = ["MixedPrecisionOptimizer"]

_BUCKET_BYTES = 32 << 20


def _param_groups(params) -> list[dict]:
    """torch-style params (Parameters, or dicts with "params") -> a list of group dicts."""
    if isinstance(params, (Tensor, nn.Module)):
        raise TypeError("tandem.optim: params must be an iterable of Parameters or of param-group dicts, "
                        f"got a {type(params).__name__} (use module.parameters())")
    items = list(params)
    if not items:
        raise ValueError("tandem.optim: got an empty parameter list")
    if all(isinstance(g, dict) for g in items):
        groups = [dict(g, params=list(g["params"])) for g in items]
    elif any(isinstance(g, dict) for g in items):
        raise TypeError("tandem.optim: params mixes Parameters and param-group dicts")
    else:
        groups = [{"params": items}]
    seen = set()
    for g in groups:
        for p in g["params"]:
            if not isinstance(p, Tensor):
                raise TypeError(f"tandem.optim: every parameter must be a Tensor, got a {type(p).__name__}")
            if not p.requires_grad:
                raise ValueError(f"tandem.optim: a parameter of shape {tuple(p.shape)} does not require grad; "
                                 "leave frozen parameters out")
            if id(p) in seen:
                raise ValueError(f"tandem.optim: a parameter of shape {tuple(p.shape)} appears twice")
            if not p.is_contiguous():
                raise ValueError(f"tandem.optim: a parameter of shape {tuple(p.shape)} is not contiguous")
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"tandem.optim: parameters must be float32, bfloat16 or float16, got {p.dtype}")
            seen.add(id(p))
    return groups


def mesh_all_reduce(t: Tensor, mesh, op: str, dims=("tp", "pp", "dp")) -> Tensor:
    """All-reduce ``t`` in place over the mesh's ``dims`` groups (each wait bounded by the
    communicator's timeout)."""
    for name in dims:
        if getattr(mesh, name) > 1:
            getattr(mesh, f"{name}_comm").all_reduce(t, op=op).wait()  # (...) reduced over `name`
    return t


class MixedPrecisionOptimizer:
    """``optimizer_class`` on fp32 master weights of ``params``; see the module docstring.

    ``params``: Parameters or param-group dicts (options such as ``weight_decay`` per
    group, as torch optimizers take them). ``mesh``: the tp x pp x dp mesh (default: the
    default mesh, else one process). ``loss_scaler``: "dynamic" (a :class:`DynamicLossScaler`),
    a DynamicLossScaler, or None; the default is "dynamic" when a parameter is float16.
    ``bucket_bytes``: fp32 gradient bytes per bucket. ``reduce_dtype``: the dtype in which
    gradients travel over dp (fp32; bf16 halves the traffic at the cost of rounding the
    summands). ``optimizer_kwargs`` go to ``optimizer_class``.

    A parameter that received no gradient in a step is stepped with a zero gradient (a
    torch optimizer skips a parameter whose ``.grad`` is None).
    """

    _shards_over_dp = False

    def __init__(self, params: Iterable, optimizer_class: type, *, mesh=None,
                 loss_scaler: Union[str, DynamicLossScaler, None] = "auto", bucket_bytes: int = _BUCKET_BYTES,
                 reduce_dtype: torch.dtype = torch.float32, **optimizer_kwargs):
        from tandem.mesh import Mesh, get_mesh

        name = type(self).__name__
        if not isinstance(optimizer_class, type) or not issubclass(optimizer_class, torch.optim.Optimizer):
            raise TypeError(f"{name}: optimizer_class must be a torch.optim.Optimizer subclass, "
                            f"got {optimizer_class!r}")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"{name}: bucket_bytes must be an int >= 1, got {bucket_bytes!r}")
        if reduce_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{name}: reduce_dtype must be torch.float32 or torch.bfloat16, got {reduce_dtype}")
        self.mesh = mesh if mesh is not None else (get_mesh() or Mesh.single())
        groups = _param_groups(params)
        self.params = [p for g in groups for p in g["params"]]
        if loss_scaler == "auto":
            loss_scaler = "dynamic" if any(p.dtype == torch.float16 for p in self.params) else None
        if loss_scaler == "dynamic":
            loss_scaler = DynamicLossScaler()
        if loss_scaler is not None and not isinstance(loss_scaler, DynamicLossScaler):
            raise TypeError(f'{name}: loss_scaler must be "dynamic", a DynamicLossScaler or None, got {loss_scaler!r}')
        self.scaler, self.reduce_dtype = loss_scaler, reduce_dtype
        shards = self.mesh.dp if self._shards_over_dp else 1
        shard = self.mesh.dp_rank if self._shards_over_dp else 0
        self.layout = Layout([g["params"] for g in groups], bucket_bytes=bucket_bytes, shards=shards, shard=shard)
        group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        inner_groups = [dict({k: v for k, v in g.items() if k != "params"}, params=[]) for g in groups]
        for pc in self.layout.pieces:
            inner_groups[group_of[id(pc.param)]]["params"].append(pc.master)
        self._empty = not any(g["params"] for g in inner_groups)
        if self._empty:  # nothing owned on this rank (a tiny model over many dp ranks)
            inner_groups[0]["params"].append(torch.zeros(0))
        self.inner = optimizer_class(inner_groups, **optimizer_kwargs)
        self.reducer = None  # set by grad_reducer (a PipelineRunner's)
        self.sync_grads = True  # False inside no_sync(): a runner leaves the buckets unreduced
        self._grads_reduced = self._prepared = False
        self._found_inf = False
        self._hooks = []
        me = weakref.ref(self)

        def fold(param):  # after autograd accumulated into param.grad: move it to main_grad
            opt = me()
            if opt is None or param.grad is None:
                return
            param.main_grad.add_(param.grad)
            param.grad = None
            if opt.reducer is not None:
                opt.reducer.on_grad(param)

        for p in self.params:
            p.main_grad = self.layout.main_grad(p)
            p._tandem_optimizer = me
            self._hooks.append(p.register_post_accumulate_grad_hook(fold))

    # --- what a training loop calls -------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's groups (of master pieces): change ``lr`` here."""
        return self.inner.param_groups

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` times the loss scale: call ``.backward()`` on this (PipelineRunner does it)."""
        return loss * self.loss_scale if self.scaler is not None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the fp32 gradient buffers (and drop any ``param.grad``)."""
        for b in self.layout.buckets:
            b.grad.zero_()  # the owned range (grad_shard) with it
        for p in self.params:
            p.grad = None
        self._grads_reduced = self._prepared = self._found_inf = False

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation: backward passes inside accumulate into the fp32 buffers
        and a ``PipelineRunner`` does not reduce them over dp (as DDP's ``no_sync``); the
        reduction comes with the last micro-step, outside, or at :meth:`step`. Reducing once
        matters for the distributed optimizer: each reduce-scatter keeps only this rank's
        shard summed, so a second one would add the other ranks' stale ranges."""
        before, self.sync_grads = self.sync_grads, False
        try:
            yield
        finally:
            self.sync_grads = before

    @torch.no_grad()
    def scale_grads(self, factor: float) -> None:
        """Multiply the accumulated fp32 gradients by ``factor`` (e.g. 1/k, the mean over k
        micro-steps); before or after the dp reduction alike (it is linear)."""
        for b in self.layout.buckets:
            b.grad.mul_(factor)

    def reduce_grads(self) -> None:
        """Reduce the gradient buckets over dp, unless a runner did it this step."""
        if self._grads_reduced:
            return
        if self.mesh.dp > 1:
            from tandem.optim._reducer import BucketReducer

            BucketReducer(self).finish()
        self._grads_reduced = True

    def prepare_grads(self) -> bool:
        """Reduce over dp, unscale, and agree over the mesh whether a gradient is inf/nan
        (only with a loss scaler); once per step. Returns that verdict."""
        if self._prepared:
            return self._found_inf
        self.reduce_grads()
        found = False
        if self.scaler is not None:
            with torch.no_grad():
                inv = 1.0 / self.scaler.scale
                bad = torch.zeros(1, dtype=torch.float32, device=self.layout.buckets[0].grad.device)
                for b in self.layout.buckets:
                    b.grad_shard.mul_(inv)
                    bad += (~torch.isfinite(b.grad_shard)).any()
                found = bool(mesh_all_reduce(bad, self.mesh, "max").item() > 0)  # every rank: the same verdict
        self._prepared, self._found_inf = True, found
        return found

    @torch.no_grad()
    def step(self) -> bool:
        """One optimizer step; returns False when it was skipped (inf/nan gradients)."""
        found_inf = self.prepare_grads()
        if self.scaler is not None:
            self.scaler.update(found_inf)
        if found_inf:
            return False
        if not self._empty:
            self.inner.step()
        self._publish()
        return True

    def _publish(self, overlap: bool = False) -> None:
        """Copy the updated masters into the parameters (cast to their dtype)."""
        for pc in self.layout.pieces:
            pc.param.data.view(-1)[pc.start:pc.end].copy_(pc.master)

    # --- for the runner, clipping and checkpoints -----------------------------------------
    def grad_reducer(self, groups):
        """The dp reducer a PipelineRunner drives (``groups``: each stage's parameters
        whose gradients autograd finishes; tied weights are reduced at the end)."""
        from tandem.optim._reducer import BucketReducer

        self.reducer = BucketReducer(self, groups)
        return self.reducer

    def master_grads(self) -> list:
        """(parameter, fp32 gradient of the part this rank owns) for every owned piece."""
        return [(pc.param, pc.master.grad) for pc in self.layout.pieces]

    @property
    def sharded(self) -> bool:
        """Whether each dp rank holds only a shard of the master gradients."""
        return self.layout.shards > 1

    def sharded_state_dict(self, names: dict) -> dict:
        """This rank's part of the state as entries for torch.distributed.checkpoint, under
        the parameters' names (``names``: id(param) -> name); see tandem.checkpoint.save."""
        from tandem.optim._dcp import optimizer_state_dict

        self.finish_param_gather()
        return optimizer_state_dict(self, names)

    def load_sharded_state_dict(self, names: dict, reader) -> None:
        """Read the state from a DCP checkpoint (``reader``: its storage reader), whatever dp
        (and tp) degree wrote it, and set the parameters from the loaded masters. Collective."""
        from tandem.optim._dcp import load_optimizer_state

        self.finish_param_gather()
        load_optimizer_state(self, names, reader)
        with torch.no_grad():
            self._publish(overlap=False)
        self.zero_grad()

    def finish_param_gather(self) -> None:
        """Nothing to wait for: the parameters are refreshed within :meth:`step`."""

    def state_bytes(self) -> int:
        """Bytes of the wrapped optimizer's state tensors on this rank (e.g. AdamW's moments)."""
        return sum(v.numel() * v.element_size() for st in self.inner.state.values() for v in st.values()
                   if isinstance(v, Tensor) and v.dim() > 0)

    def master_bytes(self) -> int:
        return sum(b.master.numel() * 4 for b in self.layout.buckets)

    def remove(self) -> None:
        """Remove the gradient hooks and ``main_grad`` views (the optimizer is done for good)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for p in self.params:
            for attr in ("main_grad", "_tandem_optimizer"):
                if hasattr(p, attr):
                    delattr(p, attr)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params)
        return (f"{type(self).__name__}({type(self.inner).__name__}, {n:,} parameters in "
                f"{len(self.layout.buckets)} buckets, shards={self.layout.shards}, "
                f"loss_scaler={'dynamic' if self.scaler else None})")
