"""Activation recomputation (Chen et al. 2016; Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models"): keep fewer activations for the backward and
compute the rest again.

``recompute(module, mode)`` applies a mode to a module in place:

- ``"none"``: keep every activation autograd saves (undoes an earlier mode);
- ``"selective"``: the attention core of every attention layer inside ``module`` (the
  ``attention_core`` method: scores q k^T, softmax, dropout, the product with v) keeps only
  its inputs q, k, v and runs again in the backward. These are the activations that grow
  with s^2 (5as^2b bytes per layer in the paper) for a few percent of the FLOPs;
- ``"full"``: ``module`` (a transformer block) keeps only its inputs; its whole forward runs
  again in the backward, just before its gradients are computed.

Both run on ``torch.utils.checkpoint`` (non-reentrant, RNG state restored, so dropout draws
the same mask), with early stopping off: the recomputed forward always runs to its end, so
the collectives inside it (TP all-reduces, SP all-gathers) are issued identically on every
rank. The backward is unchanged, so split backwards (zero-bubble B/W) work as before.
Gradients equal those without recomputation.

``kept_inputs_observer`` lets a measurement see what recomputed regions keep
(``tandem bench memory``): the tensors that a region's checkpoint holds on to are not
packed through ``saved_tensors_hooks``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

__all__ = ["recompute", "RECOMPUTE_MODES", "recompute_mode", "kept_inputs_observer"]

RECOMPUTE_MODES = ("none", "selective", "full")
_observers: list = []


@contextlib.contextmanager
def kept_inputs_observer(fn: Callable[[list], None]):
    """While active, ``fn(tensors)`` is called with the tensor inputs of every recomputed
    region that runs forward with autograd recording (what the region keeps until backward)."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)


def _checkpointed(fn: Callable, *args, **kwargs):
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    for observe in list(_observers):
        observe(tensors)
    with set_checkpoint_early_stop(False):
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def _wrap(module: nn.Module, name: str, mode: str) -> None:
    original = getattr(type(module), name)
    bound = functools.partial(_checkpointed, functools.partial(original, module))
    bound._tandem_recompute = mode  # what recompute_mode reports
    setattr(module, name, bound)


def _unwrap(module: nn.Module, name: str) -> None:
    if hasattr(getattr(module, name, None), "_tandem_recompute"):
        delattr(module, name)  # back to the class's method


def _attention_layers(module: nn.Module) -> list:
    return [m for m in module.modules() if callable(getattr(type(m), "attention_core", None))]


def recompute(module: nn.Module, mode: str) -> nn.Module:
    """Apply recomputation ``mode`` ("none" | "selective" | "full") to ``module`` in place
    and return it (see the module docstring). Raises ValueError for another mode, or for
    "selective" on a module without attention layers."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute: mode must be one of {RECOMPUTE_MODES}, got {mode!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"recompute: expected an nn.Module, got {type(module).__name__}")
    attention = _attention_layers(module)
    if mode == "selective" and not attention:
        raise ValueError(f"recompute: mode 'selective' recomputes attention cores, but {type(module).__name__} "
                         "holds no module with an attention_core method; use 'full' or 'none'")
    _unwrap(module, "forward")
    for layer in attention:
        _unwrap(layer, "attention_core")
    if mode == "full":
        _wrap(module, "forward", mode)
    elif mode == "selective":
        for layer in attention:
            _wrap(layer, "attention_core", mode)
    return module


def recompute_mode(module: nn.Module) -> str:
    """The mode applied to ``module`` ("none" when none was)."""
    if hasattr(getattr(module, "forward", None), "_tandem_recompute"):
        return "full"
    if any(hasattr(getattr(m, "attention_core", None), "_tandem_recompute") for m in _attention_layers(module)):
        return "selective"
    return "none"
