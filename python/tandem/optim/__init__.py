"""Optimizers for models too big for one device: fp32 master weights under mixed precision
(MixedPrecisionOptimizer), ZeRO-1 over dp (DistributedOptimizer), dynamic loss scaling for
fp16, the global gradient norm over tp x pp x dp (clip_grad_norm_), weight-decay groups."""

from tandem.optim.clip import clip_grad_norm_, grad_norm
from tandem.optim.distributed import DistributedOptimizer
from tandem.optim.groups import weight_decay_groups
from tandem.optim.mixed import MixedPrecisionOptimizer
from tandem.optim.precision import PRECISIONS, precision_dtype
from tandem.optim.scaler import DynamicLossScaler

__all__ = ["MixedPrecisionOptimizer", "DistributedOptimizer", "DynamicLossScaler", "clip_grad_norm_", "grad_norm",
           "weight_decay_groups", "PRECISIONS", "precision_dtype"]
