"""``decode_residual``: the tail of a Cohere decoder layer in a decode step, in one launch:
``residual + attn @ Wo.T + (silu(gate) * up) @ Wd.T``.

Why: after decode_linear, a decode layer still ends in o_proj (cuBLAS split-K + its reduction kernel), swiglu,
down_proj (split-K + reduction) and parallel_residual: up to six launches whose gaps (the recorded H100 profile of
Command-R7B decode, benchmarks/results/decode-command-r7b-20261125T174147Z.json, has the GPU idle 12 % of the
wall time inside CUDA graphs: ~2.3 us per kernel) cost more than the elementwise work itself. Both projections
stream a weight of N = hidden rows, so they share one grid: each program owns BLOCK_N output features and one
CHUNK of K, of o_proj's K (the attention width) or of down_proj's (the MLP width), so there are enough programs
to fill the GPU (down_proj alone has only hidden / BLOCK_N of them without splitting K). SwiGLU is computed on
the fly from gate and up (the MLP activation of a decode row is a few KB), and the residual sum is the epilogue.

Reduction without a second launch: each program writes its fp32 partial to its own slot and bumps a per-feature-
block counter; the program that bumps it last sums the slots in a fixed order (so results do not depend on which
program came last) and writes the output. Rounding is eager's: the two projections are rounded to the dtype,
``residual + attn`` is rounded, then ``+ mlp``; the SwiGLU product is rounded once, as cohere_fx.swiglu does.
The dots run on fp32 operands upcast from bf16/fp16 (exact under tf32), as in decode_linear.
"""
import torch
import triton
import triton.language as tl

from cohere_fx.kernels import on_device
from cohere_fx.kernels.decode_linear import MAX_ROWS


@triton.jit
def _partial_dot(a_ptr, w_ptr, gate_ptr, up_ptr, rm, rn, k_lo, M, N, K, stride_am, stride_gm, stride_um,
                 SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 partial product over K in [k_lo, k_lo + CHUNK): rows of ``a`` (or of
    swiglu(gate, up)) times rows rn of the [N, K] weight."""
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, CHUNK, BLOCK_K):
        k = k_lo + k0 + rk
        k_mask = k < K
        x_mask = m_mask[:, None] & k_mask[None, :]
        if SWIGLU:
            g = tl.load(gate_ptr + rm[:, None] * stride_gm + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + rm[:, None] * stride_um + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            # cohere_fx.swiglu's value: fp32 silu(g) * u rounded once to the activation dtype
            x = (tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u).to(gate_ptr.dtype.element_ty).to(tl.float32)
        else:
            x = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rn[:, None] * K + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(tl.float32)), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _decode_residual_kernel(res_ptr, attn_ptr, wo_ptr, gate_ptr, up_ptr, wd_ptr, part_ptr, count_ptr, out_ptr,
                            M, N, KA, KF, stride_rm, stride_am, stride_gm, stride_um, stride_om,
                            SPLITS_A: tl.constexpr, SPLITS_F: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), SPLITS_A + SPLITS_F): split s < SPLITS_A is a CHUNK of o_proj's K, the others of
    down_proj's. ``part`` is [SPLITS, M, N] fp32 (no initial value needed), ``count`` [cdiv(N, BLOCK_N)] int32
    zeros."""
    nb = tl.program_id(0)
    s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    if s < SPLITS_A:
        acc = _partial_dot(attn_ptr, wo_ptr, gate_ptr, up_ptr, rm, rn, s * CHUNK, M, N, KA, stride_am, stride_gm,
                           stride_um, False, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, DOT_PRECISION)
    else:
        acc = _partial_dot(attn_ptr, wd_ptr, gate_ptr, up_ptr, rm, rn, (s - SPLITS_A) * CHUNK, M, N, KF, stride_am,
                           stride_gm, stride_um, True, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, DOT_PRECISION)
    mn_mask = (rm < M)[:, None] & (rn < N)[None, :]
    slot = rm[:, None] * N + rn[None, :]
    tl.store(part_ptr + s * M * N + slot, acc, mask=mn_mask)
    tl.debug_barrier()  # every thread's partial is stored before the counter publishes it (acq_rel atomic)
    if tl.atomic_add(count_ptr + nb, 1) == SPLITS_A + SPLITS_F - 1:
        attn = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(SPLITS_A):
            attn += tl.load(part_ptr + i * M * N + slot, mask=mn_mask, other=0.0, cache_modifier=".cg")
        mlp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(SPLITS_A, SPLITS_A + SPLITS_F):
            mlp += tl.load(part_ptr + i * M * N + slot, mask=mn_mask, other=0.0, cache_modifier=".cg")
        dtype = out_ptr.dtype.element_ty
        res = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mn_mask, other=0.0).to(tl.float32)
        partial = (res + attn.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)  # eager: residual + o_proj(.)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], (partial + mlp.to(dtype).to(tl.float32)).to(dtype),
                 mask=mn_mask)


# (BLOCK_N, BLOCK_K, CHUNK, num_warps, num_stages). Not yet swept on a GPU (benchmarks/sweep_decode_residual.py
# does that): BLOCK_N and BLOCK_K are decode_linear's swept values for o and down; CHUNK = 2048 gives Command-R7B
# (K = 4096 + 14336) 9 splits x 128 feature blocks = 1152 programs of 128 KB of weight each.
CONFIG = (32, 256, 2048, 4, 4)


def decode_residual_fwd(residual, attn, o_weight, gate, up, down_weight, config=None):
    """residual [M, N] + attn [M, KA] @ o_weight[N, KA].T + swiglu(gate, up) [M, KF] @ down_weight[N, KF].T, in the
    inputs' dtype; M <= MAX_ROWS, unit last strides, row-major weights. The counters are zeroed per call (a memset
    of N / BLOCK_N ints, one more node in a captured step): kept counters would be state shared by every caller."""
    m, n = residual.shape
    ka, kf = attn.shape[1], gate.shape[1]
    shapes_ok = (attn.shape == (m, ka) and gate.shape == up.shape == (m, kf) and o_weight.shape == (n, ka)
                 and down_weight.shape == (n, kf))
    tensors = (residual, attn, o_weight, gate, up, down_weight)
    if (not shapes_ok or not 0 < m <= MAX_ROWS or any(t.dtype != residual.dtype for t in tensors)
            or any(t.stride(-1) != 1 for t in tensors) or not o_weight.is_contiguous()
            or not down_weight.is_contiguous()):
        raise ValueError("decode_residual: residual [M <= %d, N], attn [M, KA], o_weight [N, KA], gate and up "
                         "[M, KF], down_weight [N, KF] of one dtype, unit last strides, row-major weights; got %s"
                         % (MAX_ROWS, ", ".join(f"{t.dtype}{tuple(t.shape)}/{t.stride()}" for t in tensors)))
    block_n, block_k, chunk, warps, stages = config or CONFIG
    block_k = min(block_k, triton.next_power_of_2(max(ka, kf)))
    chunk = max(block_k, chunk // block_k * block_k)
    splits_a, splits_f = triton.cdiv(ka, chunk), triton.cdiv(kf, chunk)
    blocks = triton.cdiv(n, block_n)
    part = torch.empty((splits_a + splits_f, m, n), dtype=torch.float32, device=residual.device)
    count = torch.zeros(blocks, dtype=torch.int32, device=residual.device)
    out = torch.empty((m, n), dtype=residual.dtype, device=residual.device)
    with on_device(residual):
        _decode_residual_kernel[(blocks, splits_a + splits_f)](
            residual, attn, o_weight, gate, up, down_weight, part, count, out, m, n, ka, kf, residual.stride(0),
            attn.stride(0), gate.stride(0), up.stride(0), out.stride(0), SPLITS_A=splits_a, SPLITS_F=splits_f,
            CHUNK=chunk, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_PRECISION="ieee" if residual.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out
