"""Activation memory: what autograd keeps for the backward, measured and modelled.

``saved_activation_bytes(fn, *args)`` runs ``fn`` and counts the bytes of the distinct
storages that autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``)
plus what recomputed regions keep (their inputs), parameters excluded.

``korthikanti_bytes`` is the per-layer, per-microbatch model of Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", Table 2), for s tokens,
b sequences, hidden size h, a heads, tensor-parallel degree t, with 16-bit activations and
dropout (scaled to other dtypes by ``bytes_per_value / 2``):

    no parallelism                 sbh (34 + 5as/h)
    tensor parallel                sbh (10 + 24/t + 5as/(ht))
    tensor + sequence parallel     sbh/t (34 + 5as/h)
    + selective recomputation      the 5as/h term is gone
    full recomputation             2sbh (the block input; 2sbh/t with sequence parallelism)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["saved_activation_bytes", "korthikanti_bytes"]


def saved_activation_bytes(fn, *args, params=(), **kwargs) -> tuple[int, object]:
    """(bytes, fn's result): the distinct storages autograd saves while ``fn(*args,
    **kwargs)`` runs, and the inputs that recomputed regions keep; storages shared with
    ``params`` (weights saved for the backward) are not activations and not counted."""
    from tandem.recomputation import kept_inputs_observer

    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def note(t: Tensor) -> None:
        if not isinstance(t, Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = storage.nbytes()

    def pack(t):
        note(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            kept_inputs_observer(lambda tensors: [note(t) for t in tensors]):
        out = fn(*args, **kwargs)
    return sum(seen.values()), out


def korthikanti_bytes(*, s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                      recompute: str = "none", bytes_per_value: float = 2.0) -> float:
    """Activation bytes per transformer layer per microbatch (see the module docstring)."""
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"korthikanti_bytes: recompute must be 'none', 'selective' or 'full', got {recompute!r}")
    sbh = s * b * h
    scale = bytes_per_value / 2.0
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1) * scale
    attention = 0.0 if recompute == "selective" else 5 * a * s / h
    if sequence_parallel:
        return sbh / t * (34 + attention) * scale
    return sbh * (10 + 24 / t + attention / t) * scale
