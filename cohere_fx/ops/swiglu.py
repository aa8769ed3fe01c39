"""``cohere_fx::swiglu``: CohereMLP's ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU, as one op.

Why an op: eager runs silu and the multiply as two passes over intermediate-sized tensors and autograd keeps
silu's output for the backward (at r7b shapes, 4096 tokens x 14336, 117 MB per layer in bf16). The op saves
only gate and up, which the GEMMs that produced them keep alive anyway, and its backward (one kernel, its own
op so traced graphs stay readable) recomputes silu from gate and writes dgate and dup in one pass.

Rounding: silu(gate) * up is computed in fp32 and rounded once to the input dtype. Eager in bf16/fp16 rounds
twice: silu's output to the dtype, then the product; so the two differ by about one unit in the last place
wherever the first rounding tips the second (inductor compiling the same math rounds once too). The backward
likewise rounds dgate and dup once each, where eager rounds ``dout * up`` and uses the rounded silu output.
In fp32 the op and eager agree to fp32 rounding.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from cohere_fx.kernels import runs_on_triton
from cohere_fx.kernels.elementwise import DTYPES, check_same


def _on_triton(t: Tensor) -> bool:
    return runs_on_triton(t) and t.dtype in DTYPES


def _acc(t: Tensor) -> torch.dtype:
    """fp32 math for low-precision inputs; float64 stays float64 (reference path only)."""
    return torch.promote_types(t.dtype, torch.float32)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    acc = _acc(gate)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def swiglu_backward_reference(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    acc = _acc(gate)
    d, g, u = dout.to(acc), gate.to(acc), up.to(acc)
    s = torch.sigmoid(g)
    dgate = d * u * (s * (1 + g * (1 - s)))
    return dgate.to(gate.dtype), (d * (g * s)).to(up.dtype)


@torch.library.custom_op("cohere_fx::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    check_same("swiglu", gate, up)
    if _on_triton(gate):
        from cohere_fx.kernels.swiglu import swiglu_fwd

        return swiglu_fwd(gate, up)
    return swiglu_reference(gate, up)


@swiglu.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("cohere_fx::swiglu_backward", mutates_args=())
def swiglu_backward(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    check_same("swiglu", dout, gate, up)
    if _on_triton(gate):
        from cohere_fx.kernels.swiglu import swiglu_bwd

        return swiglu_bwd(dout, gate, up)
    return swiglu_backward_reference(dout, gate, up)


@swiglu_backward.register_fake
def _(dout, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return swiglu_backward(dout.contiguous(), gate, up)


swiglu.register_autograd(_backward, setup_context=_setup_context)
