"""``cohere_fx::swiglu_lora_shrink``: ``act = swiglu(gate, up)`` and down_proj's LoRA A input
``h = lora_shrink(act, A)`` as one op, so that their backward is one kernel (kernels/swiglu_lora_shrink.py says
why).

Forward: the two ops' own kernels, unchanged; act is an output (the base down projection reads it) but is not
saved: autograd keeps gate, up (which SwiGLU's backward needs anyway) and A. Backward: act's gradient (from the base
projection) and h's give dgate, dup and dA, equal to the unfused ops' (swiglu, lora_shrink, autograd's sum of act's
two gradients in its dtype, swiglu_backward) up to the fp32 accumulation order of dA. On devices Triton cannot run
on, the backward is that composition of the unfused ops.
"""
import torch
from torch import Tensor

from cohere_fx.kernels.elementwise import check_same
from cohere_fx.ops.lora import _check_shrink, _on_triton, _rows

ops = torch.ops.cohere_fx


def _check(gate: Tensor, up: Tensor, a: Tensor) -> None:
    check_same("swiglu_lora_shrink", gate, up)
    _check_shrink(gate, a)


@torch.library.custom_op("cohere_fx::swiglu_lora_shrink", mutates_args=())
def swiglu_lora_shrink(gate: Tensor, up: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """gate, up [..., N] bf16/fp16, A [rank, N] fp32 -> (act = swiglu(gate, up), act.to(fp32) @ A.T)."""
    _check(gate, up, a)
    act = ops.swiglu(gate, up)
    return act, ops.lora_shrink(act, a)


@swiglu_lora_shrink.register_fake
def _(gate, up, a):
    _check(gate, up, a)
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            gate.new_empty((*gate.shape[:-1], a.shape[0]), dtype=a.dtype))


@torch.library.custom_op("cohere_fx::swiglu_lora_shrink_backward", mutates_args=())
def swiglu_lora_shrink_backward(dact: Tensor, dh: Tensor, gate: Tensor, up: Tensor,
                                a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dgate, dup, dA) of swiglu_lora_shrink from act's gradient ``dact`` and h's ``dh``."""
    from cohere_fx.kernels.swiglu_lora_shrink import MAX_RANK, swiglu_lora_shrink_bwd

    if _on_triton(gate, a) and a.shape[0] <= MAX_RANK:
        dgate, dup, da = swiglu_lora_shrink_bwd(_rows(dact).contiguous(), _rows(dh).contiguous(),
                                                _rows(gate).contiguous(), _rows(up).contiguous(), a)
        return dgate.view(gate.shape), dup.view(up.shape), da
    dx, da = ops.lora_shrink_backward(dh, ops.swiglu(gate, up), a)
    dgate, dup = ops.swiglu_backward((dact + dx).contiguous(), gate, up)
    return dgate, dup, da


@swiglu_lora_shrink_backward.register_fake
def _(dact, dh, gate, up, a):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format), torch.empty_like(a))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dact, dh):
    gate, up, a = ctx.saved_tensors
    if dact is None:  # act's only reader was this op's own A: nothing flows back through the base projection
        dact = torch.zeros_like(gate)
    if dh is None:
        dh = gate.new_zeros((*gate.shape[:-1], a.shape[0]), dtype=a.dtype)
    return swiglu_lora_shrink_backward(dact, dh, gate, up, a)


swiglu_lora_shrink.register_autograd(_backward, setup_context=_setup_context)
