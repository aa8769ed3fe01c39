"""SwiGLU (``silu(gate) * up``) in Triton: one flat elementwise pass forward, one backward.

Why: eager spells the MLP's activation as two kernels (silu, then the multiply) with an intermediate-sized
silu output between them, which autograd also keeps for the backward; its backward is three more passes
(two multiplies and silu's own backward). Here the forward reads gate and up once and writes the product
once; the backward reads dout, gate and up once and writes dgate and dup once, recomputing silu from gate
(cheap arithmetic in a memory-bound kernel), so nothing but gate and up is saved.

Both kernels are 1-D over the flattened tensors (contiguous inputs, int64 offsets), math in fp32, each output
rounded once to the input dtype. silu is ``g / (1 + exp(-g))`` with an IEEE division, as torch spells it.
"""
import torch
import triton
import triton.language as tl

from cohere_fx.kernels import on_device
from cohere_fx.kernels.dependent_launch import dependent_launch, wait_for_inputs
from cohere_fx.kernels.elementwise import BLOCK, NUM_WARPS, check_kernel_inputs, grid


@triton.jit
def silu(g):
    """The forward's SiLU in fp32 (shared with swiglu_lora_shrink, whose backward recomputes it bit for bit)."""
    return tl.math.div_rn(g, 1.0 + tl.exp(-g))


@triton.jit
def swiglu_grads(dout, g, u):
    """(dgate, dup) in fp32 from fp32 dout, gate and up: d silu / dg = s * (1 + g * (1 - s)), torch's
    silu_backward formula."""
    s = tl.math.div_rn(1.0, 1.0 + tl.exp(-g))
    return dout * u * (s * (1.0 + g * (1.0 - s))), dout * (g * s)


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, numel, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (silu(g) * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    dgate, dup = swiglu_grads(dout, g, u)
    tl.store(DGATE + offs, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, dup.to(DUP.dtype.element_ty), mask=mask)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, rounded once to gate's dtype; gate's shape, contiguous."""
    check_kernel_inputs("swiglu", gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        with on_device(gate):
            _swiglu_fwd_kernel[grid(out.numel())](gate.contiguous(), up.contiguous(), out, out.numel(),
                                                  BLOCK=BLOCK, num_warps=NUM_WARPS, **dependent_launch(gate))
    return out


def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of swiglu_fwd, silu recomputed from gate; each in gate's dtype and shape."""
    check_kernel_inputs("swiglu", dout, gate, up)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    if dgate.numel():
        with on_device(gate):
            _swiglu_bwd_kernel[grid(dgate.numel())](dout.contiguous(), gate.contiguous(), up.contiguous(), dgate,
                                                    dup, dgate.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dgate, dup
