"""Helpers for comparing TP modules with their single-device twins."""

import torch

from tandem.nn.state import full_state_dict


def full_grads(module) -> dict:
    """The full (unsharded) gradient of every parameter, keyed like full_state_dict."""
    params = list(module.parameters())
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    try:
        return full_state_dict(module)
    finally:
        for p, d in zip(params, saved):
            p.data = d


def assert_dicts_close(got: dict, want: dict, what: str, **tol):
    assert got.keys() == want.keys(), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m: f"{what}[{k}]: {m}", **tol)


def shard_of(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = full.shape[dim] // size
    return full.narrow(dim, rank * n, n)
