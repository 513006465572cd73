"""TP layers that ``parallelize`` puts in place of other libraries' modules.

They keep the full-weight layout of the module they replace, so ``full_state_dict()`` of a
converted model has the original model's keys and shapes:

    FusedColumnParallelLinear  (tandem.nn.linear) nn.Linear whose output is [q; k; v] (equal
                               sections): each section is split over tp, rank r holds [q_r; k_r; v_r]
    ColumnParallelConv1D       transformers' Conv1D (weight [in, out], x @ W + b), column-parallel,
                               with optional equal sections (GPT-2's fused c_attn)
    RowParallelConv1D          the same Conv1D, row-parallel
    ReplicatedKVProjection     the k or v projection of grouped-query attention with fewer KV
                               heads than tp: the whole weight on every rank, the output only
                               this rank's KV head, the gradient summed over tp
    PaddedVocabParallelEmbedding  VocabParallelEmbedding that, like nn.Embedding(padding_idx=p),
                               gives row p no gradient

Conv1D layers hold their shard in nn.Linear's layout ([out/tp, in] or [out, in/tp]), so they run
tandem's column- and row-parallel GEMMs unchanged; only the full weights are transposed.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tandem.mesh import Mesh
from tandem.nn import _collectives as C
from tandem.nn._tp import TPInfo, init_device, linear_init_
from tandem.nn.embedding import VocabParallelEmbedding
from tandem.nn.linear import ColumnParallelLinear, FusedColumnParallelLinear, RowParallelLinear

__all__ = ["ColumnParallelConv1D", "RowParallelConv1D", "ReplicatedKVProjection",
           "PaddedVocabParallelEmbedding"]


class ColumnParallelConv1D(FusedColumnParallelLinear):
    """transformers' Conv1D(nf=out, nx=in) as a column-parallel layer (optionally in sections).

    Full weight [in, out] (Conv1D's layout); the shard is kept as [out/tp, in]. Initialised
    like Conv1D (weight N(0, 0.02), bias zero) on the full weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sections: int = 1,
                 gather_output: bool = False, mesh: Optional[Mesh] = None, device=None, dtype=None):
        if gather_output and sections > 1:
            raise ValueError("ColumnParallelConv1D: gather_output=True needs sections=1 (gathered sections "
                             "would interleave)")
        super().__init__(in_features, out_features, bias, sections=sections, mesh=mesh, device=device, dtype=dtype)
        self.gather_output = gather_output

    def reset_parameters(self) -> None:
        dev = init_device(self.weight.device)
        w = torch.empty(self.in_features, self.out_features, device=dev).normal_(std=0.02)
        b = torch.zeros(self.out_features, device=dev) if self.bias is not None else None
        self.load_full_state_dict({"weight": w, **({"bias": b} if b is not None else {})})

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict) -> None:
        super().load_full_state_dict({**sd, "weight": sd["weight"].t()})  # [in, out] -> [out, in]

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        sd = super().full_state_dict()
        return {**sd, "weight": sd["weight"].t().contiguous()}  # [out, in] -> Conv1D's [in, out]


class RowParallelConv1D(RowParallelLinear):
    """transformers' Conv1D(nf=out, nx=in) as a row-parallel layer.

    Full weight [in, out] (Conv1D's layout); the shard is kept as [out, in/tp].
    """

    def reset_parameters(self) -> None:
        dev = init_device(self.weight.device)
        w = torch.empty(self.in_features, self.out_features, device=dev).normal_(std=0.02)
        b = torch.zeros(self.out_features, device=dev) if self.bias is not None else None
        self.load_full_state_dict({"weight": w, **({"bias": b} if b is not None else {})})

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict) -> None:
        super().load_full_state_dict({**sd, "weight": sd["weight"].t()})  # [in, out] -> [out, in]

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        sd = super().full_state_dict()
        return {**sd, "weight": sd["weight"].t().contiguous()}  # [out, in] -> Conv1D's [in, out]


class ReplicatedKVProjection(nn.Module):
    """The k or v projection of grouped-query attention when num_kv_heads < tp.

    Rank r's query heads [r*H/tp, (r+1)*H/tp) all read KV head r // (tp / KV). The full weight
    [KV*head_dim, in] (and bias) is kept on every rank; the forward computes only this rank's
    head: input [..., in] (replicated) -> [..., head_dim]. Its gradient (nonzero only in the
    rows of this rank's head) is summed over tp, so every replica gets the full gradient and
    they stay equal; the input gradient is summed over tp as in a column-parallel layer.
    """

    def __init__(self, in_features: int, num_kv_heads: int, head_dim: int, bias: bool = True, *,
                 mesh: Optional[Mesh] = None, device=None, dtype=None):
        super().__init__()
        self.tp = tp = TPInfo(mesh)
        if num_kv_heads >= tp.size or tp.size % num_kv_heads:
            raise ValueError(f"ReplicatedKVProjection: num_kv_heads={num_kv_heads} must be < tp={tp.size} and divide "
                             f"it (each KV head replicated on tp/num_kv_heads ranks)")
        self.in_features, self.num_kv_heads, self.head_dim = in_features, num_kv_heads, head_dim
        self.out_features = num_kv_heads * head_dim
        self.kv_head = tp.rank // (tp.size // num_kv_heads)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, the same draws on every rank (same seed)."""
        dev = init_device(self.weight.device)
        w = torch.empty(self.out_features, self.in_features, device=dev)
        b = torch.empty(self.out_features, device=dev) if self.bias is not None else None
        linear_init_(w, b, self.in_features)
        self.weight.copy_(w)
        if b is not None:
            self.bias.copy_(b)

    def forward(self, x: Tensor) -> Tensor:
        comm = self.tp.comm
        x = C.copy_to_tp(x, comm)  # f: identity, all-reduce of the input gradient
        w, b = C.reduce_grad(self.weight, comm), C.reduce_grad(self.bias, comm)  # grads summed over tp
        rows = slice(self.kv_head * self.head_dim, (self.kv_head + 1) * self.head_dim)
        return F.linear(x, w[rows], None if b is None else b[rows])  # (..., in) @ (in, hd) -> (..., hd)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"kv_head={self.kv_head}, tp={self.tp.size}, bias={self.bias is not None}")


class PaddedVocabParallelEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding with nn.Embedding's ``padding_idx``: the padding row is looked
    up as any other but receives no gradient."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int,
                 mesh: Optional[Mesh] = None, device=None, dtype=None):
        if not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"PaddedVocabParallelEmbedding: padding_idx={padding_idx} is outside the vocabulary "
                             f"of {num_embeddings}")
        self.padding_idx = padding_idx % num_embeddings
        super().__init__(num_embeddings, embedding_dim, mesh=mesh, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """nn.Embedding's: N(0, 1) on the full table, the padding row zero."""
        full = torch.empty(self.num_embeddings, self.embedding_dim, device=init_device(self.weight.device))
        nn.init.normal_(full)
        full[self.padding_idx] = 0
        self.load_full_state_dict({"weight": full})

    def forward(self, ids: Tensor) -> Tensor:
        out = super().forward(ids)  # (...) -> (..., h), replicated
        pad = (ids == self.padding_idx).unsqueeze(-1)
        return torch.where(pad, out.detach(), out)  # no gradient flows to the padding row

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, padding_idx={self.padding_idx}"
