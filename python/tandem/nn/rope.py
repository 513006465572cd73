"""Rotary position embeddings (Su et al. 2021), as Llama, Mistral and Qwen2 use them.

The rotation pairs dimension i with i + hd/2 of each head ("rotate half", the layout of the
Hugging Face checkpoints), at angle ``position * inv_freq[i]``. The angles, cos and sin are
computed in float32 whatever the activations' dtype, then cast, which is what transformers
does: tandem's logits equal theirs to the last bits, in float64 too.

``rope_scaling`` follows Llama 3.1 (``{"rope_type": "llama3", "factor", "low_freq_factor",
"high_freq_factor", "original_max_position_embeddings"}``): long wavelengths are divided by
``factor``, short ones kept, the band between interpolated smoothly.
"""

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope", "check_rope_scaling"]

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: Optional[dict]) -> None:
    """Raise ValueError unless ``scaling`` is None or a complete Llama 3 description."""
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return
    if kind != "llama3":
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (supported: 'llama3', 'default')")
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling: llama3 scaling needs {missing}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("rope_scaling: high_freq_factor must be > low_freq_factor")


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None) -> Tensor:
    """[head_dim / 2] inverse frequencies, float32: theta ** (-2i / head_dim), Llama 3-scaled."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    check_rope_scaling(scaling)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) == "default":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long waves: / factor
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions [b, s] (ints) -> cos, sin [b, 1, s, hd] in ``dtype`` (angles in float32)."""
    angles = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)  # (b, s, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (b, s, hd)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [b, heads, s, hd] by the angles of cos, sin [b, 1, s, hd]."""
    return x * cos + _rotate_half(x) * sin
