"""DistributedOptimizer: ZeRO-1 (Rajbhandari et al. 2020) over the dp group.

As MixedPrecisionOptimizer, but dp rank r keeps the fp32 master weights and the optimizer
state of only the r-th shard of every gradient bucket (Megatron-LM's distributed optimizer
layout): per parameter and dp rank, 4 bytes of fp32 gradient plus 12/dp bytes of master and
AdamW moments instead of 12.

Step: each bucket is reduce-scattered over dp as soon as it is final (during the last
backward when a PipelineRunner drives it): rank r receives the dp average of its shard;
it steps its masters; then every bucket's updated parameters are all-gathered over dp
(in the parameters' dtype). With ``overlap_param_gather=True`` the all-gathers are only
started by :meth:`step` and waited for just before the next forward (a forward pre-hook),
so they overlap with whatever runs in between: the loop's bookkeeping, the next batch, and
on later pipeline stages the wait for the first activation.
"""

from __future__ import annotations

import torch

from tandem.optim.mixed import MixedPrecisionOptimizer

__all__ = ["DistributedOptimizer"]


class DistributedOptimizer(MixedPrecisionOptimizer):
    """``DistributedOptimizer(params, optimizer_class, *, mesh, **optimizer_kwargs)``: see the
    module docstring; the other keywords are MixedPrecisionOptimizer's, plus
    ``overlap_param_gather`` (default False)."""

    _shards_over_dp = True

    def __init__(self, params, optimizer_class, *, mesh=None, overlap_param_gather: bool = False, **kwargs):
        if not isinstance(overlap_param_gather, bool):
            raise TypeError(f"DistributedOptimizer: overlap_param_gather must be a bool, got {overlap_param_gather!r}")
        self._gathers: list = []  # (bucket, work, out) started and not yet copied into the params
        self._pre_hook = None
        super().__init__(params, optimizer_class, mesh=mesh, **kwargs)
        self.overlap_param_gather = overlap_param_gather

    def _publish(self, overlap=None) -> None:
        if self.mesh.dp == 1:
            super()._publish()
            return
        self.finish_param_gather()
        # issue in reverse bucket order: the last bucket holds the first layers' parameters
        for b in reversed(self.layout.buckets):
            send = b.master.to(b.dtype)  # (numel/dp,) this rank's updated shard
            out = torch.empty(b.numel, dtype=b.dtype, device=send.device)
            work = self.mesh.dp_comm.all_gather(out, send)  # (numel/dp,) per rank -> (numel,)
            self._gathers.append((b, work, out))
        if self.overlap_param_gather if overlap is None else overlap:
            self._pre_hook = torch.nn.modules.module.register_module_forward_pre_hook(
                lambda module, args: self.finish_param_gather())
        else:
            self.finish_param_gather()

    @torch.no_grad()
    def finish_param_gather(self) -> None:
        """Wait for the parameter all-gathers that :meth:`step` started and write the
        parameters (a no-op when none are pending)."""
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        gathers, self._gathers = self._gathers, []
        for b, work, out in gathers:
            work.wait()
            for p, off in zip(b.params, b.offsets):
                p.data.view(-1).copy_(out[off:off + p.numel()])

    def prepare_grads(self) -> bool:
        self.finish_param_gather()
        return super().prepare_grads()

    def remove(self) -> None:
        self.finish_param_gather()
        super().remove()
