"""Frameworks: how an implementation runs a transformer, where it changes the models.

The planner predicts tandem's runs (``TANDEM``). Its checks against published runs model
the framework that made them (``MEGATRON_SC21``: Megatron-LM as run for Narayanan et al.,
SC'21). The differences that matter to memory and time:

============================  ==========================  ================================
                              tandem                      Megatron-LM (SC'21 runs)
============================  ==========================  ================================
attention                     fused (SDPA/flash): no      unfused: softmax and dropout of
                              s x s tensor in memory      the [a, s, s] scores in memory
dropout                       none                        p = 0.1 (masks kept, 1 byte)
saved activations             tandem's GPT, measured      Korthikanti et al. 2022, Table 2
                              term by term (activations)
TP backward all-reduce        column-parallel input       exposed
                              gradient overlapped with
                              the weight-gradient GEMM
DP gradient reduction         buckets reduced during the  torch DDP (overlapped) without a
                              last backward of a stage    pipeline, else after the flush
stage-to-stage message        b s h (b s h / tp with SP)  scatter/gather: b s h / tp on the
                                                          network, then an all-gather
============================  ==========================  ================================
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Framework", "TANDEM", "MEGATRON_SC21", "FRAMEWORKS", "get_framework"]


@dataclass(frozen=True, kw_only=True)
class Framework:
    """One implementation's choices (see the module docstring)."""

    name: str
    attention: str
    """"flash" (fused, no score tensor kept) or "unfused\""""
    dropout: bool
    """dropout after attention scores, attention and MLP (masks kept for backward)"""
    saved: str
    """which saved-activation term list: "tandem" or "megatron" (activations.py)"""
    tp_backward_overlap: bool
    """column-parallel input-gradient all-reduce hidden behind the weight-gradient GEMM"""
    dp_overlap: str
    """"last_backward" (reduced during each stage's last backward), "no_pipeline" (only
    when pp = 1), or "none\""""
    p2p_scatter_gather: bool
    """stage-to-stage messages cut over tp on the network and all-gathered after"""
    # elementwise memory traffic of one block's forward, in passes over tensors (a pass
    # reads or writes each element once); the backward moves 1.5x as much
    replicated_passes: float
    """over [b, s, h] tensors outside the TP region (divided by tp with SP)"""
    tp_passes: float
    """over [b, s, h/tp] tensors inside the TP region"""
    ffn_passes: float
    """over [b, s, f/tp] tensors (the MLP activation when not fused into the GEMM)"""
    score_passes: float
    """over [b, a/tp, s, s] tensors (unfused attention)"""
    mask_bytes: float
    """bytes of dropout masks written per [b, s, h] element"""
    score_mask_bytes: float
    """bytes of dropout masks written per [b, a/tp, s, s] element"""
    ops_per_layer: int
    """kernels (GPU) or operator calls (CPU) of one block's forward; backward twice that"""
    wgrad_ops_per_linear: int = 0
    """kernels or operator calls of each linear layer's weight gradient beside its GEMM (whose
    own launch is the GEMM's overhead): in the W of a split backward"""
    schedules: tuple = ("1f1b", "interleaved", "zb-h1")
    """the pipeline schedules it runs (what the search enumerates)"""
    sequence_parallel: bool = True
    """whether it has sequence parallelism"""
    distributed_optimizer: bool = True
    """whether it can shard the optimizer states over dp"""
    recompute: tuple = ("none", "selective", "full")
    """the activation recomputation modes it has"""


TANDEM = Framework(
    name="tandem", attention="flash", dropout=False, saved="tandem", tp_backward_overlap=True,
    dp_overlap="last_backward", p2p_scatter_gather=False,
    # LN 2, residual add 3, LN 2, residual add 3, two bias adds 2 + 2
    replicated_passes=14.0, tp_passes=0.0,
    ffn_passes=0.0,  # GeLU in the GEMM's epilogue (CUDA); a separate pass (2) where the
    # profile says fused_gelu=False (CPU)
    score_passes=0.0, mask_bytes=0.0, score_mask_bytes=0.0, ops_per_layer=16,
    # the bias gradient's reduction, the weight gradient's accumulation into .grad / main_grad
    wgrad_ops_per_linear=2)

MEGATRON_SC21 = Framework(
    name="megatron-sc21", attention="unfused", dropout=True, saved="megatron", tp_backward_overlap=False,
    dp_overlap="no_pipeline", p2p_scatter_gather=True,
    # LN 2, bias-dropout-add 3, LN 2, bias-dropout-add 3 (+ two 1-byte masks)
    replicated_passes=10.0, mask_bytes=2.0,
    tp_passes=2.0,  # the attention context's permute to [s, b, h/tp]
    ffn_passes=2.0,  # fused bias + GeLU: read and write [b, s, f/tp]
    score_passes=4.0, score_mask_bytes=1.0,  # fused scale-mask-softmax 2, dropout 2 and its mask
    ops_per_layer=20,
    wgrad_ops_per_linear=1,  # the bias gradient; gradient accumulation fused into the GEMM
    # Megatron-LM as of the paper: 1F1B and interleaved 1F1B, full recomputation; selective
    # recomputation, sequence parallelism and the distributed optimizer came later (2022)
    schedules=("1f1b", "interleaved"), sequence_parallel=False, distributed_optimizer=False,
    recompute=("none", "full"))

FRAMEWORKS = {f.name: f for f in (TANDEM, MEGATRON_SC21)}


def get_framework(framework) -> Framework:
    if isinstance(framework, Framework):
        return framework
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {sorted(FRAMEWORKS)}, got {framework!r}")
    return FRAMEWORKS[framework]
