"""``cohere_fx::layer_norm``: CohereLayerNorm (weight only, fp32 statistics) as one op.

Why an op and not plain torch: the HF module spells the norm as ~10 elementwise/reduction nodes with an fp32
copy of the activations; one kernel reads x once and writes y once. The backward recomputes mean and rstd
from x (which it must read anyway), so nothing beyond x is saved for it.
"""
import torch
from torch import Tensor

from cohere_fx.kernels import runs_on_triton


def layer_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The HF math, step for step (modeling_cohere.CohereLayerNorm.forward)."""
    h = x.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    h = (h - mean) * torch.rsqrt(var + eps)
    return (weight.to(torch.float32) * h).to(x.dtype)


def layer_norm_backward_reference(dy: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    h = x.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    rstd = torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (h - mean) * rstd
    g = dy.to(torch.float32) * weight.to(torch.float32)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = (dy.to(torch.float32) * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


@torch.library.custom_op("cohere_fx::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if runs_on_triton(x):
        from cohere_fx.kernels.layer_norm import layer_norm_fwd

        return layer_norm_fwd(x, weight, eps)
    return layer_norm_reference(x, weight, eps)


@layer_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("cohere_fx::layer_norm_backward", mutates_args=())
def layer_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if runs_on_triton(x):
        from cohere_fx.kernels.layer_norm import layer_norm_bwd

        return layer_norm_bwd(dy, x, weight, eps)
    return layer_norm_backward_reference(dy, x, weight, eps)


@layer_norm_backward.register_fake
def _(dy, x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = layer_norm_backward(dy.contiguous(), x, weight, ctx.eps)
    return dx, dw, None


layer_norm.register_autograd(_backward, setup_context=_setup_context)
