"""The parallel block's residual sum ``residual + attn + mlp`` in one Triton pass (forward only).

Why: eager makes two passes (``residual + attn`` is written out, then read back for ``+ mlp``); here the three
inputs are read once and the sum written once. Eager rounds twice and so does this kernel, in the same order:
``residual + attn`` in fp32, rounded to the dtype, then ``+ mlp`` in fp32, rounded again. torch adds
low-precision tensors exactly so (fp32 math, one rounding per op), so the result is bitwise equal to eager's.
The backward is the output gradient itself, three times: no kernel.
"""
import torch
import triton
import triton.language as tl

from cohere_fx.kernels import on_device
from cohere_fx.kernels.elementwise import BLOCK, NUM_WARPS, check_kernel_inputs, grid


@triton.jit
def _parallel_residual_kernel(RESIDUAL, ATTN, MLP, OUT, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    residual = tl.load(RESIDUAL + offs, mask=mask, other=0.0).to(tl.float32)
    attn = tl.load(ATTN + offs, mask=mask, other=0.0).to(tl.float32)
    mlp = tl.load(MLP + offs, mask=mask, other=0.0).to(tl.float32)
    partial = (residual + attn).to(OUT.dtype.element_ty).to(tl.float32)  # eager's first rounding
    tl.store(OUT + offs, (partial + mlp).to(OUT.dtype.element_ty), mask=mask)


def parallel_residual_fwd(residual: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """(residual + attn) + mlp with eager's two roundings; residual's shape and dtype, contiguous."""
    check_kernel_inputs("parallel_residual", residual, attn, mlp)
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    if out.numel():
        with on_device(residual):
            _parallel_residual_kernel[grid(out.numel())](residual.contiguous(), attn.contiguous(), mlp.contiguous(),
                                                         out, out.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
