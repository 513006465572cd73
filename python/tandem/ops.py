"""Typed wrappers over ``torch.ops.tandem.*`` and their fake (meta) kernels.

The kernels (CPU, CUDA) and the autograd of ``linear_bias_gelu`` are C++; the fake kernels
here let ``torch.compile`` and FakeTensor trace the ops, with the same checks.
"""

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "linear_bias_gelu",
    "linear_bias_gelu_fwd",
    "linear_bias_gelu_backward_input",
    "linear_bias_gelu_backward_weight",
    "linear_dgelu_bgrad",
]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def linear_bias_gelu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     approximate: str = "tanh") -> Tensor:
    """``gelu(input @ weight.T + bias)``: F.linear then F.gelu(approximate=...), fused.

    input is [..., in_features], weight [out_features, in_features], bias [out_features].
    Differentiable. On CUDA in fp16/bf16 with approximate="tanh": one cuBLASLt matmul with a
    GeLU epilogue; fp32 takes torch's GEMM and the exact GeLU (the epilogue's tanh is
    approximate). ``tandem._C._linear_gelu_paths()`` counts which path ran.
    """
    return torch.ops.tandem.linear_bias_gelu(input, weight, bias, approximate)


def linear_bias_gelu_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         approximate: str = "tanh") -> tuple[Tensor, Tensor]:
    """Forward that also returns the pre-activation ``input @ weight.T + bias`` for backward."""
    return torch.ops.tandem.linear_bias_gelu_fwd(input, weight, bias, approximate)


def linear_bias_gelu_backward_input(grad_output: Tensor, pre_activation: Tensor, weight: Tensor,
                                    approximate: str = "tanh") -> tuple[Tensor, Tensor, Tensor]:
    """B step: (grad_input, grad_pre_activation, grad_bias) from the output gradient."""
    return torch.ops.tandem.linear_bias_gelu_backward_input(grad_output, pre_activation, weight, approximate)


def linear_bias_gelu_backward_weight(grad_pre_activation: Tensor, input: Tensor) -> Tensor:
    """W step: grad_weight = grad_pre_activation^T @ input, [out_features, in_features]."""
    return torch.ops.tandem.linear_bias_gelu_backward_weight(grad_pre_activation, input)


def linear_dgelu_bgrad(grad_output: Tensor, weight: Tensor, pre_activation: Tensor,
                       approximate: str = "tanh") -> tuple[Tensor, Tensor]:
    """Backward through ``linear(gelu(pre), weight)`` down to ``pre``: returns
    (grad_pre = (grad_output @ weight) * gelu'(pre), grad_bias = grad_pre summed over tokens).

    weight is the next layer's [N2, N]; pre_activation [..., N] is what
    :func:`linear_bias_gelu_fwd` kept. On CUDA (fp16/bf16, "tanh") one cuBLASLt matmul with
    the DGELU_BGRAD epilogue: the MLP's fc2 input-gradient GEMM also does fc1's GeLU backward
    and bias gradient.
    """
    return torch.ops.tandem.linear_dgelu_bgrad(grad_output, weight, pre_activation, approximate)


def _check_approximate(approximate: str) -> None:
    torch._check_value(approximate in ("tanh", "none"),
                       lambda: f'approximate must be "tanh" or "none" (as torch.nn.GELU), got "{approximate}"')


def _check_linear(op: str, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    torch._check_value(weight.dim() == 2, lambda: f"{op}: weight must be 2-D, got shape {tuple(weight.shape)}")
    torch._check_value(input.dim() >= 1, lambda: f"{op}: input must have at least 1 dimension")
    torch._check_value(
        input.shape[-1] == weight.shape[1],
        lambda: f"{op}: input shape {tuple(input.shape)} has {input.shape[-1]} features but weight "
        f"shape {tuple(weight.shape)} expects in_features={weight.shape[1]}",
    )
    torch._check_type(input.dtype in _FLOATS, lambda: f"{op}: unsupported dtype {input.dtype}")
    torch._check_type(input.dtype == weight.dtype,
                      lambda: f"{op}: input dtype {input.dtype} differs from weight dtype {weight.dtype}")
    torch._check_value(input.device == weight.device,
                       lambda: f"{op}: input is on {input.device} but weight is on {weight.device}")
    if bias is not None:
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: f"{op}: bias shape {tuple(bias.shape)} does not match out_features={weight.shape[0]}",
        )
        torch._check_type(bias.dtype == weight.dtype,
                          lambda: f"{op}: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")


def _out_like(input: Tensor, n: int) -> Tensor:
    return input.new_empty((*input.shape[:-1], n))


@torch.library.register_fake("tandem::linear_bias_gelu")
def _(input, weight, bias=None, approximate="tanh"):
    _check_linear("linear_bias_gelu", input, weight, bias)
    _check_approximate(approximate)
    return _out_like(input, weight.shape[0])


@torch.library.register_fake("tandem::linear_bias_gelu_fwd")
def _(input, weight, bias=None, approximate="tanh"):
    _check_linear("linear_bias_gelu_fwd", input, weight, bias)
    _check_approximate(approximate)
    return _out_like(input, weight.shape[0]), _out_like(input, weight.shape[0])


@torch.library.register_fake("tandem::linear_bias_gelu_backward_input")
def _(grad_output, pre_activation, weight, approximate="tanh"):
    _check_approximate(approximate)
    torch._check_value(grad_output.shape == pre_activation.shape,
                       lambda: "linear_bias_gelu_backward_input: grad_output and pre_activation shapes differ")
    torch._check_value(pre_activation.shape[-1] == weight.shape[0],
                       lambda: "linear_bias_gelu_backward_input: pre_activation does not match weight")
    grad_input = pre_activation.new_empty((*pre_activation.shape[:-1], weight.shape[1]))
    grad_pre = pre_activation.new_empty(pre_activation.shape)
    return grad_input, grad_pre, weight.new_empty((weight.shape[0],))


@torch.library.register_fake("tandem::linear_bias_gelu_backward_weight")
def _(grad_pre_activation, input):
    return input.new_empty((grad_pre_activation.shape[-1], input.shape[-1]))


@torch.library.register_fake("tandem::linear_dgelu_bgrad")
def _(grad_output, weight, pre_activation, approximate="tanh"):
    _check_approximate(approximate)
    torch._check_value(weight.dim() == 2 and grad_output.shape[-1] == weight.shape[0],
                       lambda: "linear_dgelu_bgrad: grad_output does not match weight")
    torch._check_value(pre_activation.shape[-1] == weight.shape[1],
                       lambda: "linear_dgelu_bgrad: pre_activation does not match weight")
    return pre_activation.new_empty(pre_activation.shape), weight.new_empty((weight.shape[1],))
