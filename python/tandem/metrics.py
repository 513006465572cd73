"""The numbers people watch while training: model FLOPs and MFU, and memory per rank.

Model FLOPs are counted as Narayanan et al. 2021 ("Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM", section 5.1) count them: every GEMM of the model
(2 FLOPs per multiply-add), the two attention GEMMs over the full s x s score matrix, the
logit GEMM, times 3 for forward + backward, and no recomputation (so MFU does not reward
recomputing). For a GPT-2-shaped model this is their closed form
``72 B s l h^2 (1 + s / 6h + V / 12lh)``; :func:`model_flops_per_token` also covers GQA,
SwiGLU and any MLP width. MFU is the achieved model FLOP/s per device over the device's
peak dense FLOP/s in the compute dtype (:data:`PEAK_TFLOPS`, vendors' datasheets).

Memory per rank: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the exact bytes of
parameters, gradients and optimizer states plus the measured peak of the activations that
autograd saves for backward (:class:`SavedActivations`).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

__all__ = ["model_flops_per_token", "narayanan_flops", "PEAK_TFLOPS", "peak_tflops", "compute_dtype_name",
           "SavedActivations", "memory_breakdown", "tensor_bytes"]


def model_flops_per_token(cfg, seq_len: Optional[int] = None) -> float:
    """Training FLOPs (forward + backward) per token of tandem's GPT at sequence length
    ``seq_len`` (default ``cfg.max_seq_len``), Narayanan et al.'s way (see the module)."""
    s = seq_len or cfg.max_seq_len
    h, layers, vocab = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    head_dim = h // cfg.num_heads
    kv = (cfg.num_kv_heads or cfg.num_heads) * head_dim
    ffn = cfg.ffn_hidden_size
    mlp_mats = 3 if cfg.activation == "swiglu" else 2  # gate, up, down / fc1, fc2
    # weights each token multiplies, per layer: q (h x h), k and v (h x kv each), out (h x h), MLP
    gemm_params = layers * (2 * h * h + 2 * h * kv + mlp_mats * h * ffn) + h * vocab  # + logits
    attention = layers * 2 * s * h  # per token: q k^T and scores @ v, each s x h multiply-adds
    forward = 2 * (gemm_params + attention)  # 2 FLOPs per multiply-add
    return 3.0 * forward  # backward = 2 x forward


def narayanan_flops(batch: int, seq_len: int, layers: int, hidden: int, vocab: int) -> float:
    """Narayanan et al. 2021's model FLOPs per iteration of a GPT-2-shaped model (MLP width
    4h, multi-head attention), without recomputation: 72 B s l h^2 (1 + s/6h + V/12lh)."""
    b, s, l, h, v = batch, seq_len, layers, hidden, vocab
    return 72.0 * b * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))


# Peak dense (no sparsity) TFLOP/s per device by compute dtype, from the vendors' datasheets.
# Matched against torch.cuda.get_device_name() in order: the first key found in the name as a
# whole word wins ("NVIDIA H100 80GB HBM3" is an H100 SXM5; an empty entry means "unknown").
PEAK_TFLOPS = {
    "H100 NVL": {},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5},  # SXM5
    "H200": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0},
    "V100-PCIE": {"fp32": 14.0, "fp16": 112.0},
    "V100": {"fp32": 15.7, "fp16": 125.0},  # SXM2
    "MI300X": {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4},
}


def compute_dtype_name(dtype: torch.dtype) -> str:
    """The PEAK_TFLOPS column of GEMMs in ``dtype``: fp32 GEMMs count as tf32 when torch
    lets cuBLAS use TF32 (see :func:`tf32_matmul`)."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return "tf32" if tf32_matmul() else "fp32"


def tf32_matmul() -> bool:
    """Whether torch's fp32 matmuls on CUDA may use TF32. Read through the new API
    (``torch.backends.cuda.matmul.fp32_precision``, which reflects the legacy
    ``allow_tf32`` too) where torch has it: reading ``allow_tf32`` after a user set the new
    API raises ("mix of the legacy and new APIs")."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        own = matmul.fp32_precision
        return (own if own != "none" else getattr(torch.backends, "fp32_precision", "none")) == "tf32"
    return bool(matmul.allow_tf32)


def peak_tflops(device_name: str, dtype_name: str) -> Optional[float]:
    """The peak of :data:`PEAK_TFLOPS` for a device name and dtype column, or None when unknown."""
    for key, peaks in PEAK_TFLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return peaks.get(dtype_name)
    return None


def tensor_bytes(tensors: Iterable) -> int:
    """Bytes of the distinct storages of ``tensors`` (None entries skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class _Held:
    """A saved tensor, counted while autograd keeps it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


class SavedActivations:
    """Measures the bytes of activations autograd saves for backward, and their peak.

    ``with meter.measure(): loss = step(...)``: every tensor saved for backward inside (by
    any autograd function, including pipeline stages' forwards) is counted from the time it
    is saved until autograd frees it; storages are counted once however many tensors view
    them; parameters (``exclude``) are not activations and are not counted. ``peak``: the
    most bytes held at once since the meter was made (or :meth:`reset`).
    """

    def __init__(self, exclude: Iterable = ()):
        self._exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self._refs: dict = {}  # storage pointer -> [bytes, count]
        self.current = self.peak = 0

    def reset(self) -> None:
        self.peak = self.current

    def _pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._exclude or isinstance(t, torch.nn.Parameter) or t.device.type == "meta":
            return t
        ref = self._refs.get(key)
        if ref is None:
            ref = self._refs[key] = [storage.nbytes(), 0]
            self.current += ref[0]
            self.peak = max(self.peak, self.current)
        ref[1] += 1
        return _Held(t, self, key)

    def _release(self, key) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[1] -= 1
        if ref[1] == 0:
            del self._refs[key]
            self.current -= ref[0]

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def measure(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


def memory_breakdown(params: list, optimizer=None, activations_peak: int = 0) -> dict:
    """Bytes on this rank: ``params``, ``grads`` (``.grad``, and ``.main_grad`` buffers where
    an optimizer keeps fp32 gradients), ``optimizer`` (every tensor of the optimizer's state,
    fp32 master weights included), ``activations`` (a measured peak) and ``total``."""
    grads = [p.grad for p in params] + [getattr(p, "main_grad", None) for p in params]
    out = {"params": tensor_bytes(params), "grads": tensor_bytes(grads), "optimizer": _optimizer_bytes(optimizer),
           "activations": int(activations_peak)}
    out["total"] = sum(out.values())
    return out


def _optimizer_bytes(optimizer) -> int:
    if optimizer is None:
        return 0
    if hasattr(optimizer, "state_bytes"):  # tandem.optim: sharded states and fp32 masters
        masters = optimizer.master_bytes() if hasattr(optimizer, "master_bytes") else 0
        return int(optimizer.state_bytes()) + int(masters)
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
