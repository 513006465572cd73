"""Parameter groups for weight decay: decay the weights of linear layers, not norms, biases
or embeddings (the convention of GPT-2/3, Megatron-LM and nanoGPT)."""

from __future__ import annotations

from typing import Iterable, Union

from torch import nn

__all__ = ["weight_decay_groups", "decays"]

_EMBEDDINGS = ("Embedding", "VocabParallelEmbedding", "TiedWeight", "GPTEmbedding")


def decays(module: nn.Module, name: str, param) -> bool:
    """Whether ``param`` (``module``'s own parameter ``name``) takes weight decay: a weight of
    two or more dimensions that is not an embedding table (a tied LM head's weight is the
    embedding's, so it does not decay either)."""
    if param.dim() < 2 or name.endswith("bias"):
        return False  # biases, norm weights and biases
    if "norm" in type(module).__name__.lower():
        return False
    return not any(type(module).__name__ == kind for kind in _EMBEDDINGS)


def weight_decay_groups(modules: Union[nn.Module, Iterable[nn.Module]], weight_decay: float) -> list[dict]:
    """Two param groups over the parameters of ``modules`` (each parameter once, in module
    order): ``{"params": [...], "weight_decay": weight_decay}`` and ``{"params": [...],
    "weight_decay": 0.0}``, for torch optimizers and tandem's alike."""
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay_groups: weight_decay must be >= 0, got {weight_decay}")
    if isinstance(modules, nn.Module):
        modules = [modules]
    decay, no_decay, seen = [], [], set()
    for top in modules:
        for module in top.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                (decay if decays(module, name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
