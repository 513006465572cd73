"""VocabParallelEmbedding and vocab_parallel_cross_entropy: the vocabulary split over tp.

Rank r owns token ids [r*V/tp, (r+1)*V/tp). The embedding looks up the ids it owns, zeros
the others, and all-reduces; the cross entropy works on logits sharded along the
vocabulary ([..., V/tp], what a column-parallel LM head gives) without ever gathering them.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tandem.mesh import Mesh
from tandem.nn import _collectives as C
from tandem.nn import wgrad
from tandem.nn._tp import TPInfo, check_divisible, init_device, new_param, shard

__all__ = ["VocabParallelEmbedding", "vocab_parallel_cross_entropy"]


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding(num_embeddings, embedding_dim) with the rows split over tp.

    Input: token ids [...] (replicated on the TP ranks). Output: [..., embedding_dim],
    replicated. Initialised like nn.Embedding (N(0, 1)) on the full table, then sharded.
    """

    _tp_leaf = True  # a TP leaf: full_state_dict() gathers its shards

    def __init__(self, num_embeddings: int, embedding_dim: int, *, mesh: Optional[Mesh] = None,
                 device=None, dtype=None):
        super().__init__()
        self.tp = TPInfo(mesh)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.local_num = check_divisible("VocabParallelEmbedding", "num_embeddings", num_embeddings, self.tp.size)
        self.vocab_start = self.tp.rank * self.local_num
        self.weight = new_param((self.local_num, embedding_dim), device, dtype, tp_dim=0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        full = torch.empty(self.num_embeddings, self.embedding_dim, device=init_device(self.weight.device))
        nn.init.normal_(full)
        self.load_full_state_dict({"weight": full})

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"VocabParallelEmbedding: token ids must be int32/int64, got {ids.dtype}")
        if self.tp.comm is None:
            return wgrad.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_num)
        out = wgrad.embedding(local.masked_fill(outside, 0), self.weight)  # (...) -> (..., h), own rows only
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return C.reduce_from_tp(out, self.tp.comm)  # (..., h) summed over tp: every id found once

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict) -> None:
        self.weight.copy_(shard(sd["weight"], 0, self.tp))

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        w = self.weight.detach()
        return {"weight": w.clone() if self.tp.comm is None else C.all_gather(w, self.tp.comm, 0)}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (local rows {self.local_num}), tp={self.tp.size}"


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, mesh: Optional[Mesh] = None) -> Tensor:
    """F.cross_entropy(full_logits, target, ignore_index=..., label_smoothing=...) (mean over
    the non-ignored targets) computed from this rank's vocabulary shard ``logits`` [..., V/tp].

    Three all-reduces of [...]-sized tensors (max, sum of exp, target logit; a fourth for
    label smoothing) replace gathering [..., V]. Without tp (the whole vocabulary here) it is
    ATen's fused cross entropy on the logits upcast to at least float32, with the same mean (0 when every target
    is ignored).
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"vocab_parallel_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits shape {tuple(logits.shape)} does not match "
                         f"target shape {tuple(target.shape)} (expected logits [..., V/tp] for target [...])")
    tp = TPInfo(mesh)
    if tp.comm is None:
        z = _at_least_fp32(logits).reshape(-1, logits.shape[-1])  # (N, V)
        total = F.cross_entropy(z, target.reshape(-1), ignore_index=ignore_index, reduction="sum",
                                label_smoothing=label_smoothing)
        return total / (target != ignore_index).sum().clamp(min=1).to(total.dtype)
    return sharded_cross_entropy(logits, target, tp, ignore_index=ignore_index, label_smoothing=label_smoothing)


def _at_least_fp32(x: Tensor) -> Tensor:
    """Low precision upcast to float32; float32 and float64 kept (as F.cross_entropy keeps them)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def sharded_cross_entropy(logits: Tensor, target: Tensor, tp: TPInfo, *, ignore_index: int = -100,
                          label_smoothing: float = 0.0) -> Tensor:
    """The vocabulary-sharded cross entropy of ``vocab_parallel_cross_entropy`` (also the
    reference its tp = 1 path is tested against)."""
    comm = tp.comm
    local_v = logits.shape[-1]
    vocab = local_v * tp.size
    z = _at_least_fp32(logits)
    # max over the full vocabulary, for stability only (no gradient flows through it)
    m = z.detach().amax(-1)
    if comm is not None:
        m = C.all_reduce(m, comm, op="max")  # (...) -> (...)
    z = z - m.unsqueeze(-1)
    sum_exp = C.reduce_from_tp(z.exp().sum(-1), comm)  # (...) summed over tp
    lse = sum_exp.log()
    valid = target != ignore_index
    local = target - tp.rank * local_v
    mine = valid & (local >= 0) & (local < local_v)
    picked = z.gather(-1, local.clamp(0, local_v - 1).unsqueeze(-1)).squeeze(-1) * mine
    target_logit = C.reduce_from_tp(picked, comm)  # (...) the target's logit, found on one rank
    loss = lse - target_logit
    if label_smoothing > 0:
        mean_z = C.reduce_from_tp(z.sum(-1), comm) / vocab
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - mean_z)
    count = valid.sum()
    return (loss * valid).sum() / count.clamp(min=1).to(loss.dtype)
