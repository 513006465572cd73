"""The validation loss of `tandem train`: forward passes only, over the fixed validation
batches, with or without a pipeline; the mean over every batch and dp rank."""

import torch

__all__ = ["evaluator"]


def _all_reduce(t, comm) -> torch.Tensor:
    t = t.reshape(1).contiguous()
    comm.all_reduce(t).wait()  # (1,) summed over the group
    return t.reshape(())


def evaluator(cfg, mesh, model, runner=None):
    """``evaluate(batches) -> float``: the mean validation loss over ``batches`` (this dp
    rank's list of (inputs, targets)) and over dp, the same on every rank. ``runner``: the
    PipelineRunner when pp > 1 (its forward runs the schedule's F actions only)."""
    from tandem.nn import vocab_parallel_cross_entropy

    def one_batch(inputs, targets) -> torch.Tensor:
        if runner is None:
            return model(inputs, targets).detach().float()
        first, last = 0 in runner.stages, runner.layout.num_stages - 1 in runner.stages
        logits = runner.forward(inputs if first else None)  # (b, s, V/tp) on the last stage, else None
        loss = (vocab_parallel_cross_entropy(logits, targets, mesh=mesh).float() if last
                else torch.zeros((), device=mesh.device))
        return _all_reduce(loss, mesh.pp_comm)  # () summed over pp: only the last stage adds

    @torch.no_grad()
    def evaluate(batches) -> float:
        total = torch.zeros((), device=mesh.device)
        for inputs, targets in batches:
            total += one_batch(inputs.to(mesh.device), targets.to(mesh.device))
        total /= len(batches)
        if mesh.dp > 1:
            total = _all_reduce(total, mesh.dp_comm) / mesh.dp
        return total.item()

    return evaluate
