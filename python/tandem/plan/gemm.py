"""GEMM and elementwise kernel times on a device profile.

A GEMM (M x K) @ (K x N), ``batch`` times, does 2 M N K batch FLOPs. Its time is

    t = t0 + 2 M N K batch / (peak * e) * (1 + d0/M + d0/N + d0/K)

``e`` (``gemm_efficiency``) is what a large GEMM reaches; the factor in d0
(``gemm_half_dim``) is the efficiency curve over shape: a small dimension means little reuse
of each loaded element (low arithmetic intensity) and partly empty tiles, and costs time
the way the memory traffic of a tiled GEMM grows with 1/M + 1/N + 1/K. ``t0``
(``gemm_overhead``) is the launch and tail. The three parameters are fitted by
``tandem plan --calibrate`` on a measured grid of shapes.

Elementwise kernels (LayerNorm, residual adds, softmax, dropout) are memory-bound:
``bytes / (memory_bw * memory_efficiency)`` plus ``op_overhead`` per kernel.
"""

from __future__ import annotations

__all__ = ["gemm_time", "gemm_flops", "shape_factor", "memory_time"]


def gemm_flops(m: float, n: float, k: float, batch: float = 1) -> float:
    return 2.0 * m * n * k * batch


def shape_factor(profile, m: float, n: float, k: float) -> float:
    """(1 + d0/M + d0/N + d0/K): how much slower than a large GEMM, per FLOP."""
    d0 = profile.gemm_half_dim
    return 1.0 + d0 / m + d0 / n + d0 / k


def gemm_time(profile, m: float, n: float, k: float, *, batch: float = 1, dtype: str = "bf16") -> float:
    """Seconds for ``batch`` GEMMs of (m x k) @ (k x n) on ``profile``."""
    rate = profile.peak(dtype) * profile.gemm_efficiency
    return profile.gemm_overhead + gemm_flops(m, n, k, batch) / rate * shape_factor(profile, m, n, k)


def memory_time(profile, nbytes: float, kernels: float = 0) -> float:
    """Seconds to move ``nbytes`` through device memory in ``kernels`` kernels."""
    return nbytes / (profile.memory_bw * profile.memory_efficiency) + kernels * profile.op_overhead
