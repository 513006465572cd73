"""Measure what autograd keeps for backward: the check of the activation memory model.

``saved_activation_bytes(fn, exclude=params)`` runs ``fn()`` under
``torch.autograd.graph.saved_tensors_hooks`` and adds up the bytes of every distinct storage
a saved tensor lives in (a storage saved by several operations, or through several views,
counts once), leaving out ``exclude`` (the parameters, which are not activations).
"""

from __future__ import annotations

__all__ = ["saved_activation_bytes"]


def saved_activation_bytes(fn, *, exclude=()) -> tuple[int, object]:
    """(bytes of the distinct storages saved for backward while ``fn()`` runs, its result).

    Keep the result alive while the bytes matter: the saved tensors belong to its graph.
    """
    import torch

    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and storage.nbytes():
            seen.setdefault(ptr, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
