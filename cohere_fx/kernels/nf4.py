"""bitsandbytes' NF4 weight with double quantisation, dequantised in one pass: ``nf4_dequantize``.

Why: a QLoRA step dequantises every 4-bit base weight twice (forward, and again in MatMul4Bit's backward), and
bitsandbytes does each in three launches issued from Python: the 8-bit block scales (``dequantize_blockwise``),
their offset (an add), then the 4-bit values (``dequantize_4bit``). In the profiled H100 QLoRA step of r7b-8L
(benchmarks/results/train-qlora-r7b-8L-20261206T084041Z.json) that is 107 x 3 launches, 4.5 ms of GPU time, and a
host that the step waits on: 100.1 ms with eager launches against 92.4 ms when inductor's CUDA graphs replay it
(084656Z / 084542Z). Here one launch reads the packed codes and the block scales and writes the weight.

The math is bitsandbytes', rounding for rounding (no fused multiply-adds: ``enable_fp_fusion=False``):
  scale[b] = fp32(code8[absmax_q[b]] * absmax_scale[b // 256]) + offset        (the 8-bit scales of 64-value blocks)
  w[i]     = dtype(NF4[q[i]] * scale[i // blocksize])                          (two codes a byte, the high nibble first)
NF4 is the QLoRA paper's table of 16 normal-distribution quantiles (bitsandbytes' ``get_4bit_type("nf4")``; a test
checks the two agree).
"""
import functools

import torch
import triton
import triton.language as tl

from cohere_fx.kernels import cdiv, on_device

NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
SCALE_BLOCK = 256  # bitsandbytes' block of the second (fp32) scales over the 8-bit ones
BLOCK = 4096  # weight values per program: not yet swept on a GPU
WARPS = 8


@triton.jit
def _to_bf16(x):
    """fp32 -> bf16, rounded to nearest-even through the bits (finite x): the GPU's cast rounds so, Triton's CPU
    interpreter truncates, and the tests compare bits with bitsandbytes'."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _nf4_dequantize_kernel(Q, ABSMAX_Q, CODE8, ABSMAX_SCALE, OFFSET, NF4_TABLE, OUT, n, BLOCKSIZE: tl.constexpr,
                           SCALE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    byte = tl.load(Q + i // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> (4 - 4 * (i % 2).to(tl.int32))) & 0xF
    b = i // BLOCKSIZE
    scale = tl.load(CODE8 + tl.load(ABSMAX_Q + b, mask=mask, other=0).to(tl.int32)) * \
        tl.load(ABSMAX_SCALE + b // SCALE_BLOCK, mask=mask, other=0.0)
    scale = scale + tl.load(OFFSET)
    w = tl.load(NF4_TABLE + code) * scale
    if OUT.dtype.element_ty == tl.bfloat16:
        w = _to_bf16(w)
    tl.store(OUT + i, w.to(OUT.dtype.element_ty), mask=mask)


@functools.lru_cache
def _nf4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4, dtype=torch.float32, device=device)


def nf4_dequantize(q: torch.Tensor, absmax_q: torch.Tensor, code8: torch.Tensor, absmax_scale: torch.Tensor,
                   offset: torch.Tensor, blocksize: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """q: packed uint8 codes (any shape, two a byte); absmax_q: uint8 block scales, code8: their fp32 [256] table,
    absmax_scale: fp32 scales of 256 of them each, offset: fp32 scalar -> the weight, ``shape`` in ``dtype``."""
    out = torch.empty(tuple(shape), dtype=dtype, device=q.device)
    n = out.numel()
    with on_device(q):
        _nf4_dequantize_kernel[(cdiv(n, BLOCK),)](
            q, absmax_q, code8, absmax_scale, offset, _nf4_table(q.device), out, n, BLOCKSIZE=blocksize,
            SCALE_BLOCK=SCALE_BLOCK, BLOCK=BLOCK, num_warps=WARPS, enable_fp_fusion=False)
    return out
