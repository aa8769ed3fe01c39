"""``cohere_fx::decode_residual``: a decode layer's ``residual + o_proj(attn) + down_proj(swiglu(gate, up))`` as
one op.

Why an op: in a decode step those are four ops and up to six kernel launches (cuBLAS splits o_proj's and
down_proj's K and reduces in a second kernel), each a few microseconds of launch gap around a weight stream;
the Triton kernel (kernels/decode_residual.py) streams both weights in one launch and adds the residual in its
epilogue. Inference only: no autograd formula; the pattern applies it only where the graph computes no gradient.

Rounding: as the unfused ops round: o_proj and down_proj each an fp32 dot rounded once, the SwiGLU product
rounded once (cohere_fx.swiglu), ``residual + attn`` rounded, then ``+ mlp`` rounded (cohere_fx.parallel_residual);
only the order of each fp32 accumulation differs.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from cohere_fx.kernels import runs_on_triton
from cohere_fx.kernels.decode_linear import MAX_ROWS
from cohere_fx.ops.parallel_residual import parallel_residual_reference
from cohere_fx.ops.swiglu import swiglu_reference


def decode_residual_reference(residual: Tensor, attn: Tensor, o_weight: Tensor, gate: Tensor, up: Tensor,
                              down_weight: Tensor) -> Tensor:
    return parallel_residual_reference(residual, F.linear(attn, o_weight),
                                       F.linear(swiglu_reference(gate, up), down_weight))


def _check(residual, attn, o_weight, gate, up, down_weight) -> None:
    lead, n = residual.shape[:-1], residual.shape[-1]
    ka, kf = attn.shape[-1], gate.shape[-1]
    if (attn.shape[:-1] != lead or gate.shape != up.shape or gate.shape[:-1] != lead or o_weight.shape != (n, ka)
            or down_weight.shape != (n, kf)):
        raise ValueError(f"decode_residual: residual [..., N], attn [..., KA], o_weight [N, KA], gate and up "
                         f"[..., KF], down_weight [N, KF] expected, got residual {tuple(residual.shape)}, attn "
                         f"{tuple(attn.shape)}, o_weight {tuple(o_weight.shape)}, gate {tuple(gate.shape)}, up "
                         f"{tuple(up.shape)}, down_weight {tuple(down_weight.shape)}")


def _fits_kernel(tensors: tuple[Tensor, ...]) -> bool:
    residual = tensors[0]
    rows = residual.numel() // residual.shape[-1] if residual.shape[-1] else 0
    return (runs_on_triton(residual) and residual.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and 0 < rows <= MAX_ROWS and all(t.dtype == residual.dtype for t in tensors)
            and tensors[2].is_contiguous() and tensors[5].is_contiguous())


@torch.library.custom_op("cohere_fx::decode_residual", mutates_args=())
def decode_residual(residual: Tensor, attn: Tensor, o_weight: Tensor, gate: Tensor, up: Tensor,
                    down_weight: Tensor) -> Tensor:
    """residual [..., N], attn [..., KA], o_weight [N, KA], gate and up [..., KF], down_weight [N, KF] -> [..., N]."""
    tensors = (residual, attn, o_weight, gate, up, down_weight)
    _check(*tensors)
    if not _fits_kernel(tensors):
        return decode_residual_reference(*tensors)
    from cohere_fx.kernels.decode_residual import decode_residual_fwd

    rows = [t.reshape(-1, t.shape[-1]).contiguous() for t in (residual, attn, gate, up)]
    out = decode_residual_fwd(rows[0], rows[1], o_weight, rows[2], rows[3], down_weight)
    return out.view(residual.shape)


@decode_residual.register_fake
def _(residual, attn, o_weight, gate, up, down_weight):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)
