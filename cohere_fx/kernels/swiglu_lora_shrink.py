"""The backward of a LoRA'd down projection's adapter input and the SwiGLU before it, as one pass over the MLP's
intermediate tensors.

Why: under LoRA the SwiGLU output ``act = silu(gate) * up`` ([tokens, 14336] at r7b) is read by the frozen base
down projection and by down's LoRA A. The unfused backward makes five passes over tensors of that size after the
base GEMM has written act's gradient: ``lora_shrink``'s x gradient ``dh @ A`` is written (1 write), added to the
base's gradient (2 reads, 1 write), act is recomputed from gate and up for A's gradient (2 reads, 1 write; it is not
saved, recompute.py) and read by that gradient's kernel (1 read), then SwiGLU's backward reads the summed gradient,
gate and up and writes dgate and dup (3 reads, 2 writes): 13 intermediate-sized transfers. Here one kernel reads
the base's gradient, gate and up and writes dgate and dup: 5. At r7b's shapes (4096 tokens) that is ~940 MB less
traffic per layer.

A program owns BLOCK_N of the intermediate features and one partition of the tokens, and walks its rows: per
[BLOCK_M, BLOCK_N] tile it computes ``dh @ A`` (exact products: kernels/lora.py), rounds it to the activation dtype
and adds the base's gradient with one more rounding (autograd's sum of the two gradients of act, in the activation
dtype), applies SwiGLU's backward (the formulas and roundings of kernels/swiglu.py), recomputes act as SwiGLU's
forward rounds it, and accumulates A's gradient ``dh.T @ act`` over its rows in fp32; the partitions' partial
sums are added afterwards in a fixed order (deterministic). Every rounding is the unfused ops' own, so the values
equal theirs up to the fp32 accumulation order of A's gradient.
"""
import torch
import triton
import triton.language as tl

from cohere_fx.kernels import cdiv, on_device
from cohere_fx.kernels.lora import (SPLIT_FP32_DOTS, _bf16_dot, _exact_dot, _fp32_dot_precision, _partitions, _parts,
                                    _parts_dot, _precision, _tiles)
from cohere_fx.kernels.swiglu import silu, swiglu_grads

MAX_RANK = 32  # the padded rank one program holds beside its [BLOCK_M, BLOCK_N] tiles (A's parts: [RANK, BLOCK_N])
# (BLOCK_M, BLOCK_N, warps, stages), the best of its H100 sweeps over the tiles that compile for sm_90 without
# spilling: with act pinned (_pinned) 325.8 us at r7b's down_proj shapes (4096 tokens, 14336, rank 16) against
# 377.5 us for the previous (32, 32, 4, 2) unpinned and 538.5 us for the unfused kernels, in one run
# (benchmarks/results/sweep-swiglu_lora_shrink-h100-20261206T1858.txt); unpinned, this tile took 458.7 us
# (…T1724.txt)
CONFIG = (32, 64, 4, 2)


@triton.jit
def _pinned(x):
    """x, through an identity Triton cannot move or duplicate (inline PTX marked impure).

    Why: act is computed in the layout of the tile's loads and stores, and is the B operand of A's gradient dot.
    Triton's dot-operand optimisation hoists the conversion into the operand layout above act's elementwise
    producers, up to the loads: gate and up then each pass through shared memory, and the SwiGLU chain (two exps,
    two IEEE divisions) is computed a second time in the operand layout. Pinned, act is converted once (sm_90 at
    CONFIG: 16 ex2 instead of 32, 168 registers instead of 190; CONFIG's comment has the timings)."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=False, pack=1)


@triton.jit
def _swiglu_lora_shrink_bwd_kernel(DACT, DH, GATE, UP, A, DGATE, DUP, DA_PART, M, N, R, rows, stride_dhm,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK: tl.constexpr,
                                   DX_PRECISION: tl.constexpr, SPLIT: tl.constexpr, DX_BF16: tl.constexpr,
                                   DA_PRECISION: tl.constexpr, DA_BF16: tl.constexpr, STAGES: tl.constexpr,
                                   PIN_ACT: tl.constexpr):
    """Program (j, p): columns j*BLOCK_N.. of the [M, N] tensors, rows of partition p. dgate, dup: SwiGLU's backward
    of round(dact + round(dh @ A)); DA_PART[p] = dh[rows].T @ act[rows] ([R, N], summed over p afterwards)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    p = tl.program_id(1)
    rr = tl.arange(0, RANK)
    a = tl.load(A + rr[:, None] * N + rn[None, :], mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    if SPLIT:
        a1, a2, a3 = _parts(a)
    da = tl.zeros((RANK, BLOCK_N), dtype=tl.float32)
    dtype = DGATE.dtype.element_ty
    m_end = tl.minimum(p * rows + rows, M)
    for m0 in tl.range(p * rows, m_end, BLOCK_M, num_stages=STAGES):
        rm = m0 + tl.arange(0, BLOCK_M)
        dh = tl.load(DH + rm[:, None] * stride_dhm + rr[None, :], mask=(rm[:, None] < m_end) & (rr[None, :] < R),
                     other=0.0)
        if SPLIT:
            dh1, dh2, dh3 = _parts(dh)
            dx = _parts_dot(dh1, dh2, dh3, a1, a2, a3, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DX_PRECISION,
                            DX_BF16)
        else:
            dx = tl.dot(dh, a, input_precision=DX_PRECISION)
        mask = (rm[:, None] < m_end) & (rn[None, :] < N)
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        dact = tl.load(DACT + offs, mask=mask, other=0.0).to(tl.float32)
        dact = (dact + dx.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
        dgate, dup = swiglu_grads(dact, g, u)
        tl.store(DGATE + offs, dgate.to(dtype), mask=mask)
        tl.store(DUP + offs, dup.to(dtype), mask=mask)
        act = silu(g) * u
        if PIN_ACT:
            act = _pinned(act)
        act = act.to(dtype)
        da = _exact_dot(tl.trans(dh), act if DA_BF16 else act.to(tl.float32), da, False, DA_PRECISION, DA_BF16)
    tl.store(DA_PART + (p * R + rr[:, None]) * N + rn[None, :], da, mask=(rr[:, None] < R) & (rn[None, :] < N))


def swiglu_lora_shrink_bwd(dact: torch.Tensor, dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                           a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dact, gate, up [M, N] (bf16/fp16, contiguous), dh [M, R] fp32, A [R, N] fp32 -> (dgate, dup in gate's
    dtype, dA fp32 [R, N]) of ``h = swiglu(gate, up).to(fp32) @ A.T`` whose act also received ``dact``."""
    (m, n), r = gate.shape, a.shape[0]
    rank = _tiles(r)[0]
    if rank > MAX_RANK:
        raise ValueError(f"swiglu_lora_shrink: rank {r} is above {MAX_RANK}")
    block_m, block_n, warps, stages = CONFIG
    dgate = torch.empty_like(gate)
    dup = torch.empty_like(gate)
    parts, rows = _partitions(cdiv(n, block_n), m, block_m, gate)
    partial = torch.empty((parts, r, n), dtype=torch.float32, device=gate.device)
    with on_device(gate):
        _swiglu_lora_shrink_bwd_kernel[(cdiv(n, block_n), parts)](
            dact, dh, gate, up, a, dgate, dup, partial, m, n, r, rows, dh.stride(0), BLOCK_M=block_m,
            BLOCK_N=block_n, RANK=rank, DX_PRECISION=_fp32_dot_precision(gate), SPLIT=SPLIT_FP32_DOTS,
            DX_BF16=gate.is_cuda, DA_PRECISION=_precision(gate), DA_BF16=_bf16_dot(gate), STAGES=stages,
            PIN_ACT=gate.is_cuda, num_warps=warps)  # the interpreter runs no inline PTX
    return dgate, dup, partial.sum(0) if parts > 1 else partial[0]
