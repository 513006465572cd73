"""Drop-in torch.nn modules backed by tandem's kernels."""

from tandem.nn.fused import FusedLinearGELU

__all__ = ["FusedLinearGELU"]
