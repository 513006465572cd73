"""Full (unsharded) state dicts of models made of tandem TP modules.

A TP leaf module (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, ...)
defines ``full_state_dict()`` and ``load_full_state_dict(sd)`` with nn.Linear / nn.Embedding
keys and shapes. These two functions do the same for any tree around them: leaves are
gathered or sharded, every other parameter is replicated and taken as it is.
"""

import torch
from torch import nn

__all__ = ["full_state_dict", "load_full_state_dict", "FullStateDictMixin"]


def _is_leaf(m: nn.Module) -> bool:
    return getattr(m, "_tp_leaf", False)


def full_state_dict(module: nn.Module) -> dict:
    """{name: full tensor} for every parameter of ``module``, as the single-device model has them.

    Collective over the TP group: every TP rank must call it.
    """
    if _is_leaf(module):
        return module.full_state_dict()
    out = {name: p.detach().clone() for name, p in module.named_parameters(recurse=False)}
    for child_name, child in module.named_children():
        for k, v in full_state_dict(child).items():
            out[f"{child_name}.{k}"] = v
    return out


@torch.no_grad()
def load_full_state_dict(module: nn.Module, sd: dict, *, strict: bool = True) -> None:
    """Load full tensors into ``module``, each TP leaf keeping its own shard."""
    missing = []

    def visit(m: nn.Module, prefix: str) -> set:
        if _is_leaf(m):
            keys = {f"{prefix}{n}" for n, _ in m.named_parameters()}
            absent = [k for k in keys if k not in sd]
            missing.extend(absent)
            if not absent:
                m.load_full_state_dict({k[len(prefix):]: sd[k] for k in keys})
            return keys
        used = set()
        for name, p in m.named_parameters(recurse=False):
            key = f"{prefix}{name}"
            used.add(key)
            if key not in sd:
                missing.append(key)
            elif tuple(sd[key].shape) != tuple(p.shape):
                raise ValueError(f"load_full_state_dict: {key} has shape {tuple(sd[key].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            else:
                p.copy_(sd[key])
        for child_name, child in m.named_children():
            used |= visit(child, f"{prefix}{child_name}.")
        return used

    used = visit(module, "")
    unexpected = sorted(set(sd) - used)
    if strict and (missing or unexpected):
        raise KeyError(f"load_full_state_dict: missing keys {sorted(missing)}, unexpected keys {unexpected}")


class FullStateDictMixin:
    """Gives a container module ``full_state_dict()`` and ``load_full_state_dict(sd)``."""

    def full_state_dict(self) -> dict:
        return full_state_dict(self)

    def load_full_state_dict(self, sd: dict, *, strict: bool = True) -> None:
        load_full_state_dict(self, sd, strict=strict)
