"""``cohere_fx::decode_residual``: a decode step's ``residual + attn @ o_weight.T + mlp @ down_weight.T`` (o_proj,
down_proj and the Cohere parallel residual) as one op.

Why an op: the Triton kernel (kernels/decode_residual.py) streams o's and down's weights as one stream in one
launch and writes the layer's output, where the unfused step runs three launches (two ``decode_linear`` and a
``parallel_residual``). Inference only: no autograd formula; the pattern applies it only to ``decode_linear``
calls, which exist only where the graph computes no gradient.

Rounding: the unfused ops', to the bit: each product rounded once to the dtype, then the two sums in eager's order.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from cohere_fx.ops.decode_linear import fits_kernel


def decode_residual_reference(residual: Tensor, attn: Tensor, o_weight: Tensor, mlp: Tensor,
                              down_weight: Tensor) -> Tensor:
    return residual + F.linear(attn, o_weight) + F.linear(mlp, down_weight)


@torch.library.custom_op("cohere_fx::decode_residual", mutates_args=())
def decode_residual(residual: Tensor, attn: Tensor, o_weight: Tensor, mlp: Tensor, down_weight: Tensor) -> Tensor:
    """residual [..., N], attn [..., Ko], mlp [..., Kd]; o_weight [N, Ko], down_weight [N, Kd] -> [..., N]."""
    n = residual.shape[-1]
    if o_weight.shape != (n, attn.shape[-1]) or down_weight.shape != (n, mlp.shape[-1]) \
            or not residual.shape[:-1] == attn.shape[:-1] == mlp.shape[:-1]:
        raise ValueError(f"decode_residual: residual [..., N], attn [..., Ko], mlp [..., Kd] and weights [N, Ko], "
                         f"[N, Kd] expected, got {tuple(residual.shape)}, {tuple(attn.shape)}, "
                         f"{tuple(o_weight.shape)}, {tuple(mlp.shape)}, {tuple(down_weight.shape)}")
    if not (fits_kernel(attn, [o_weight]) and fits_kernel(mlp, [down_weight]) and residual.dtype == attn.dtype
            == mlp.dtype):
        return decode_residual_reference(residual, attn, o_weight, mlp, down_weight)
    from cohere_fx.kernels.decode_residual import decode_residual_fwd

    def rows(t):
        return t.reshape(-1, t.shape[-1]).contiguous()

    out = decode_residual_fwd(rows(residual), rows(attn), o_weight, rows(mlp), down_weight)
    return out.view(residual.shape)


@decode_residual.register_fake
def _(residual, attn, o_weight, mlp, down_weight):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)
