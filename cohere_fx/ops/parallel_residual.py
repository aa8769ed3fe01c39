"""``cohere_fx::parallel_residual``: the Cohere decoder layer's ``residual + attn + mlp`` as one op.

Why an op: eager writes ``residual + attn`` out and reads it back to add ``mlp``; the kernel reads the three
inputs once and writes the sum once, with eager's two roundings in eager's order, so the result is bitwise
eager's. The gradient of a sum is the output gradient for every term: the backward returns it three times and
saves nothing.
"""
import torch
from torch import Tensor

from cohere_fx.kernels import runs_on_triton
from cohere_fx.kernels.elementwise import DTYPES, check_same


def parallel_residual_reference(residual: Tensor, attn: Tensor, mlp: Tensor) -> Tensor:
    return residual + attn + mlp


@torch.library.custom_op("cohere_fx::parallel_residual", mutates_args=())
def parallel_residual(residual: Tensor, attn: Tensor, mlp: Tensor) -> Tensor:
    check_same("parallel_residual", residual, attn, mlp)
    if runs_on_triton(residual) and residual.dtype in DTYPES:
        from cohere_fx.kernels.parallel_residual import parallel_residual_fwd

        return parallel_residual_fwd(residual, attn, mlp)
    return parallel_residual_reference(residual, attn, mlp)


@parallel_residual.register_fake
def _(residual, attn, mlp):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


def _backward(ctx, grad):
    return grad, grad, grad


parallel_residual.register_autograd(_backward)
