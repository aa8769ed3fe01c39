"""``cohere_fx::decode_swiglu``: a decode step's ``decode_linear`` over q, k, v, gate and up with the MLP's
``swiglu(gate, up)`` folded in: [x @ w.T for w in weights] + [silu(x @ gate.T) * (x @ up.T)].

Why an op: the SwiGLU launch that follows the projections reads gate and up back and writes the activation, one
more launch (and gap) per layer for a few hundred KB. In the Triton kernel (kernels/decode_linear.py, its SWIGLU
slot) each program that streams a block of gate's rows streams up's matching rows and writes the activation.
Inference only, like ``decode_linear``.

Rounding: the two launches', to the bit: gate and up each an fp32 dot rounded once to the dtype, then the SwiGLU
kernel's fp32 math, rounded once.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from cohere_fx.kernels.decode_linear import MAX_WEIGHTS
from cohere_fx.ops.decode_linear import fits_kernel
from cohere_fx.ops.swiglu import swiglu_reference


def decode_swiglu_reference(x: Tensor, weights: list[Tensor], gate_weight: Tensor, up_weight: Tensor
                            ) -> list[Tensor]:
    return [F.linear(x, w) for w in weights] + [swiglu_reference(F.linear(x, gate_weight), F.linear(x, up_weight))]


@torch.library.custom_op("cohere_fx::decode_swiglu", mutates_args=())
def decode_swiglu(x: Tensor, weights: list[Tensor], gate_weight: Tensor, up_weight: Tensor) -> list[Tensor]:
    """x [..., K]; weights [N_i, K] (at most MAX_WEIGHTS - 2); gate and up [I, K] -> [..., N_i] each, then [..., I]."""
    k = x.shape[-1]
    if len(weights) > MAX_WEIGHTS - 2 or gate_weight.shape != up_weight.shape \
            or any(w.dim() != 2 or w.shape[1] != k for w in [*weights, gate_weight]):
        raise ValueError(f"decode_swiglu: at most {MAX_WEIGHTS - 2} weights [N, {k}] and gate and up weights of one "
                         f"shape [I, {k}], got {[tuple(w.shape) for w in weights]}, gate {tuple(gate_weight.shape)}, "
                         f"up {tuple(up_weight.shape)}")
    every = [*weights, gate_weight, up_weight]
    if not fits_kernel(x, every):
        return decode_swiglu_reference(x, weights, gate_weight, up_weight)
    from cohere_fx.kernels.decode_linear import decode_linear_fwd

    outs = decode_linear_fwd(x.reshape(-1, k).contiguous(), every, swiglu=True)
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]


@decode_swiglu.register_fake
def _(x, weights, gate_weight, up_weight):
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in [*weights, gate_weight]]
