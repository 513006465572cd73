"""The precisions tandem trains in: their parameter and compute dtype."""

import torch

__all__ = ["PRECISIONS", "precision_dtype"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    """"fp32" | "bf16" | "fp16" -> the dtype of parameters and compute (ValueError otherwise)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]
