"""PEFT LoRA's low-rank path on a low-precision base, without fp32 copies of the activations: ``lora_shrink``
(``h = x.to(fp32) @ A.T``) and ``lora_expand`` (``out = round(base + (h @ B.T) * scaling)``), forward and backward.

Why: PEFT keeps the adapters in fp32 over a bf16 model (``autocast_adapter_dtype``), so each LoRA'd linear casts its
input to an fp32 copy (which autograd then keeps for A's gradient: three activations per layer, the [tokens,
14336] SwiGLU output among them), runs its A and B GEMMs in fp32 on CUDA cores, writes B's output as an fp32
[tokens, out] tensor, scales it, adds the bf16 base output in fp32 and rounds; the backward casts the output
gradient to an fp32 copy before two fp32 GEMMs. In the recorded H100 profile of the r7b-8L LoRA step
(benchmarks/results/train-lora-r7b-8L-20261125T174433Z.json) the rank-16/80 GEMMs took ~17 ms of the 103 ms.
Here every pass reads the bf16 activation or gradient once and writes its result once; nothing [tokens,
features]-sized is fp32.

Exactness: PEFT's fp32 products (exact, or within fp32 rounding where both operands are fp32), accumulated in
fp32 in another order.
- Every product of an fp32 adapter operand with a bf16/fp16 activation or gradient (``x @ A.T`` forward; in the
  backward ``dh.T @ x`` for A's gradient, ``dy @ B`` for h's, ``dy.T @ h`` for B's) runs on the tensor cores with
  exact products: the fp32 operand is split into three bf16-representable parts that sum to it exactly
  (``_exact_dot``). For bf16 activations on a GPU the parts meet the activation as bf16 dots (the fp32 rate
  would be half, and converting the big operand to fp32 cost more than the loads); otherwise as tf32 dots on an
  fp32 copy of the tile (bf16 and fp16 values are tf32-representable; the interpreter's fp32 dot is exact). With
  tf32x3 dots on ``dy.float() * scaling`` the three gradient passes took 9.1 ms of a 94.2 ms H100 LoRA step
  (benchmarks/results/train-lora-r7b-8L-20261206T042915Z.json).
- fp32 x fp32 products with the rank as their short side (``h @ B.T``, ``dh @ A``) run on the tensor cores as six
  bf16 dots: both operands are split into three exact bf16 parts (``_parts``) and the six partial products whose
  parts' orders sum to at most 4 are added (``_parts_dot``); the three left out are each below 2^-24 of the
  product, the size of fp32 rounding itself (the parts as fp32 IEEE dots under the interpreter). As IEEE dots
  (CUDA-core FMAs) ``dh @ A`` alone took 31 ms of a 125 ms H100 LoRA step
  (benchmarks/results/train-lora-r7b-8L-20261206T031500Z.json); as Triton's tf32x3 (~2^-22 per product) it ran at
  half the speed of the bf16 parts (SPLIT_FP32_DOTS).
- Rounding points are PEFT's: ``(h @ B.T) * scaling`` is rounded in fp32, added to the base in fp32 and rounded
  once to its dtype (bitsandbytes' 4-bit layers round the update to the dtype before the add: ``ROUND_UPDATE``).
  PEFT's output gradient is ``dy.float() * scaling``; here the scaling multiplies the fp32 sums instead (the same
  for a power-of-two scaling, otherwise within one fp32 rounding per product).

Long reductions (over the tokens for A's and B's gradients, over the output features for ``dh``) are split into
partitions that write fp32 partial sums, added afterwards in a fixed order: deterministic, no atomics. At ranks up
to 32 ``lora_expand``'s backward reads dy once for both of its gradients (``_expand_bwd_kernel``): dy is the
largest operand of every LoRA pass ([tokens, 14336] for gate and up), and the separate passes read it twice.
"""
import torch
import triton
import triton.language as tl

from cohere_fx.kernels import cdiv, next_power_of_2, on_device, persistent_programs

MAX_RANK = 128  # the rank (or the sum of the ranks of fused A matrices) that one tile holds
BLOCK_M = 64  # tiles (with _tiles): not yet swept on a GPU
# lora_expand's fused backward (benchmarks/sweep_lora.py): dy's columns per program (dh's partial sums,
# [N / BLOCK_N, M, rank] fp32, cost 2 * rank / BLOCK_N of dy's bytes), rows per step and warps; the largest padded
# rank it takes (registers: [BLOCK_N, rank] fp32 tiles)
EXPAND_BWD_BLOCK_N = 256
EXPAND_BWD_BLOCK_M = 64
EXPAND_BWD_WARPS = 4
FUSED_BWD_MAX_RANK = 32
# Software-pipelining depth of the kernels' loops (over rows, or over A's columns in _shrink_dx_kernel), per
# backward: lora_expand's (one pass, or two _row_sum passes above FUSED_BWD_MAX_RANK) and lora_shrink's (shrink_dx and
# the _row_sum for dA), each the best of 1-3 in its H100 sweep (sweep-lora-h100-20261206T0637.txt,
# sweep-lora-shrink-h100-20261206T0653.txt).
EXPAND_BWD_STAGES = 2
SHRINK_BWD_STAGES = 3
SHRINK_DX_PERSISTENT = True  # _shrink_dx_kernel's grid (shrink_dx); False: one [BLOCK_M, block_k] tile a program
# The fp32 x fp32 dots (shrink_dx's dh @ A, _expand_fwd_kernel's h @ B.T): six bf16 dots of exact three-part splits
# of both operands (_parts_dot), or Triton's tf32x3 (a tf32 wgmma reads both operands from shared memory; a bf16 one
# takes the row operand's parts from registers). shrink_dx at rank 16 on an H100: 15.5 / 53.8 us against tf32x3's
# 32.0 / 111.1 us (K 4096 / 14336, sweep-lora-tiles-h100-20261206T0830.txt).
SPLIT_FP32_DOTS = True
# lora_shrink's backward above rank 32 (lora_shared_input's five A matrices, rank 80 padded to 128): (BLOCK_M,
# BLOCK_K, warps) of shrink_dx and (BLOCK_M, BLOCK_C, warps) of dA's _row_sum, the best of their H100 sweeps
# (sweep-lora-tiles-h100-20261206T0822.txt, then T0830 with the split dots: dx 184.5 -> 84.1 us, dA 60.2 -> 38.6 us)
WIDE_DX_TILE = (128, 64, 8)
WIDE_DA_TILE = (32, 128, 8)
# (BLOCK_M, BLOCK_K, warps) of lora_shrink's forward at every rank, the best of its H100 sweep
# (sweep-lora-fwd-h100-20261206T0837.txt: x [4096, 4096] at rank 80 107.6 -> 52.5 us; rank 16 at K 4096 and 14336
# 20.0 -> 18.0 and 57.2 -> 48.8 us)
SHRINK_FWD_TILE = (64, 64, 4)


@triton.jit
def _parts(v):
    """Three bf16-representable parts that sum to the fp32 v exactly: each is what the ones before it leave, rounded
    to 8 significant bits, and the third time at most 8 bits are left."""
    p1 = v.to(tl.bfloat16)
    rest = v - p1.to(tl.float32)
    p2 = rest.to(tl.bfloat16)
    return p1, p2, (rest - p2.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _as_factor(part, BF16_DOT: tl.constexpr):
    return part if BF16_DOT else part.to(tl.float32)


@triton.jit
def _exact_dot(lhs, rhs, acc, SPLIT_RHS: tl.constexpr, PRECISION: tl.constexpr, BF16_DOT: tl.constexpr):
    """acc + lhs @ rhs where one operand is fp32 and the other's values are bf16- (or fp16-) representable: the fp32
    one (rhs if SPLIT_RHS else lhs) is split into three bf16-representable parts that sum to it exactly, so that
    every partial product is exact. BF16_DOT: the other operand is bf16 and the parts are multiplied as bf16 (the
    tensor cores' bf16 rate, no fp32 copy of the big operand); otherwise the other operand is fp32 and the dots run
    at PRECISION, which must keep 11 mantissa bits (tf32, ieee)."""
    p1, p2, p3 = _parts(rhs if SPLIT_RHS else lhs)
    if SPLIT_RHS:
        acc = tl.dot(lhs, _as_factor(p1, BF16_DOT), acc, input_precision=PRECISION)
        acc = tl.dot(lhs, _as_factor(p2, BF16_DOT), acc, input_precision=PRECISION)
        acc = tl.dot(lhs, _as_factor(p3, BF16_DOT), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(_as_factor(p1, BF16_DOT), rhs, acc, input_precision=PRECISION)
        acc = tl.dot(_as_factor(p2, BF16_DOT), rhs, acc, input_precision=PRECISION)
        acc = tl.dot(_as_factor(p3, BF16_DOT), rhs, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _parts_dot(l1, l2, l3, r1, r2, r3, acc, PRECISION: tl.constexpr, BF16_DOT: tl.constexpr):
    """acc + lhs @ rhs for two fp32 operands given as their _parts: the six partial products whose parts' orders sum
    to at most 4, smallest first; the three left out are each below 2^-24 of the product (fp32 rounding's size).
    BF16_DOT: the parts are multiplied as bf16 (exact products, fp32 sums); otherwise as fp32 at PRECISION."""
    acc = tl.dot(_as_factor(l3, BF16_DOT), _as_factor(r1, BF16_DOT), acc, input_precision=PRECISION)
    acc = tl.dot(_as_factor(l2, BF16_DOT), _as_factor(r2, BF16_DOT), acc, input_precision=PRECISION)
    acc = tl.dot(_as_factor(l1, BF16_DOT), _as_factor(r3, BF16_DOT), acc, input_precision=PRECISION)
    acc = tl.dot(_as_factor(l2, BF16_DOT), _as_factor(r1, BF16_DOT), acc, input_precision=PRECISION)
    acc = tl.dot(_as_factor(l1, BF16_DOT), _as_factor(r2, BF16_DOT), acc, input_precision=PRECISION)
    return tl.dot(_as_factor(l1, BF16_DOT), _as_factor(r1, BF16_DOT), acc, input_precision=PRECISION)


@triton.jit
def _shrink_fwd_kernel(X, A, PART, M, R, stride_xm, K: tl.constexpr, K_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, RANK: tl.constexpr, PRECISION: tl.constexpr, BF16_DOT: tl.constexpr):
    """PART[s, M, R] = x[M, chunk s of K] @ A[R, chunk s of K].T, summed over s afterwards: a program owns
    BLOCK_M rows, the whole rank and one chunk of K (4096 tokens are only 64 row blocks: too few programs alone)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    s = tl.program_id(1)
    rr = tl.arange(0, RANK)
    rk = s * K_CHUNK + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
    for k0 in range(0, K_CHUNK, BLOCK_K):
        k = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        a_t = tl.load(A + rr[None, :] * K + k[:, None], mask=(rr[None, :] < R) & (k[:, None] < K), other=0.0)
        acc = _exact_dot(x if BF16_DOT else x.to(tl.float32), a_t, acc, True, PRECISION, BF16_DOT)
    tl.store(PART + (s * M + rm[:, None]) * R + rr[None, :], acc, mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _shrink_dx_kernel(DH, A, DX, M, R, k_chunk, stride_dhm, stride_dxm, K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr, RANK: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
                      SPLIT: tl.constexpr, BF16_DOT: tl.constexpr):
    """dx[M, K] = dh[M, R] @ A[R, K], rounded to dx's dtype (PEFT's cast of x to fp32, differentiated): a program
    holds BLOCK_M rows of dh (SPLIT: as their _parts, split once) and walks k_chunk columns of A (pipelined),
    writing dx tile by tile."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, RANK)
    dh = tl.load(DH + rm[:, None] * stride_dhm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    if SPLIT:
        dh1, dh2, dh3 = _parts(dh)
    k_end = tl.minimum(tl.program_id(1) * k_chunk + k_chunk, K)
    for k0 in tl.range(tl.program_id(1) * k_chunk, k_end, BLOCK_K, num_stages=STAGES):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(A + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < k_end), other=0.0)
        if SPLIT:
            a1, a2, a3 = _parts(a)
            dx = _parts_dot(dh1, dh2, dh3, a1, a2, a3, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), PRECISION,
                            BF16_DOT)
        else:
            dx = tl.dot(dh, a, input_precision=PRECISION)
        tl.store(DX + rm[:, None] * stride_dxm + rk[None, :], dx.to(DX.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rk[None, :] < k_end))


@triton.jit
def _row_sum_kernel(W, Y, PART, M, R, C, rows, scaling, stride_wm, stride_ym, stride_yc, stride_pr, stride_pc,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RANK: tl.constexpr, PRECISION: tl.constexpr,
                    BF16_DOT: tl.constexpr, STAGES: tl.constexpr):
    """PART[p] ([R, C], or [C, R] through the strides) = (w[rows of partition p].T @ y[those rows]) * scaling,
    w [M, R] fp32, y [M, C] bf16/fp16 (any strides), summed over p afterwards; exact products (_exact_dot). A's
    gradient: w = dh, y = x over the tokens; B's, transposed: w = h, y = dy over the tokens; h's, transposed: w = B,
    y = dy.T over the output features."""
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1)
    rr = tl.arange(0, RANK)
    acc = tl.zeros((RANK, BLOCK_C), dtype=tl.float32)
    m_end = tl.minimum(p * rows + rows, M)
    # A runtime-bounded, software-pipelined loop (loads of the next rows in flight during this step's dots). Under
    # Triton 3.6's interpreter such loops need numpy < 2.4 (triton-lang/triton#9171; requirements-test.txt pins it).
    for m0 in tl.range(p * rows, m_end, BLOCK_M, num_stages=STAGES):
        m = m0 + tl.arange(0, BLOCK_M)
        w_t = tl.load(W + m[None, :] * stride_wm + rr[:, None], mask=(m[None, :] < m_end) & (rr[:, None] < R),
                      other=0.0)
        y = tl.load(Y + m[:, None] * stride_ym + rc[None, :] * stride_yc,
                    mask=(m[:, None] < m_end) & (rc[None, :] < C), other=0.0)
        acc = _exact_dot(w_t, y if BF16_DOT else y.to(tl.float32), acc, False, PRECISION, BF16_DOT)
    tl.store(PART + p * R * C + rr[:, None] * stride_pr + rc[None, :] * stride_pc, acc * scaling,
             mask=(rr[:, None] < R) & (rc[None, :] < C))


@triton.jit
def _expand_bwd_kernel(DY, H, B, DH_PART, DB_PART, M, N, R, rows, scaling, stride_dym, stride_hm,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK: tl.constexpr, PRECISION: tl.constexpr,
                       BF16_DOT: tl.constexpr, STAGES: tl.constexpr):
    """Both gradients of lora_expand from one read of dy: program (j, p) owns dy's columns j*BLOCK_N.. and the rows
    of partition p. DH_PART[j, rows] = (dy[rows, cols] @ B[cols]) * scaling (summed over j afterwards);
    DB_PART[p, cols] = (dy[rows, cols].T @ h[rows]) * scaling (summed over p afterwards); exact products."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    p = tl.program_id(1)
    rr = tl.arange(0, RANK)
    b = tl.load(B + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
    db = tl.zeros((BLOCK_N, RANK), dtype=tl.float32)
    m_end = tl.minimum(p * rows + rows, M)
    for m0 in tl.range(p * rows, m_end, BLOCK_M, num_stages=STAGES):  # pipelined: see _row_sum_kernel
        rm = m0 + tl.arange(0, BLOCK_M)
        dy = tl.load(DY + rm[:, None] * stride_dym + rn[None, :], mask=(rm[:, None] < m_end) & (rn[None, :] < N),
                     other=0.0)
        dy = dy if BF16_DOT else dy.to(tl.float32)
        h = tl.load(H + rm[:, None] * stride_hm + rr[None, :], mask=(rm[:, None] < m_end) & (rr[None, :] < R),
                    other=0.0)
        dh = _exact_dot(dy, b, tl.zeros((BLOCK_M, RANK), dtype=tl.float32), True, PRECISION, BF16_DOT)
        tl.store(DH_PART + (tl.program_id(0) * M + rm[:, None]) * R + rr[None, :], dh * scaling,
                 mask=(rm[:, None] < m_end) & (rr[None, :] < R))
        db = _exact_dot(tl.trans(dy), h, db, True, PRECISION, BF16_DOT)
    tl.store(DB_PART + (p * N + rn[:, None]) * R + rr[None, :], db * scaling,
             mask=(rn[:, None] < N) & (rr[None, :] < R))


@triton.jit
def _expand_fwd_kernel(BASE, H, B, OUT, M, N, R, scaling, stride_bm, stride_hm, stride_om, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, RANK: tl.constexpr, ROUND_UPDATE: tl.constexpr,
                       PRECISION: tl.constexpr, SPLIT: tl.constexpr, BF16_DOT: tl.constexpr):
    """out[M, N] = round(base + round?((h @ B.T) * scaling)), the fp32 math of PEFT's LoRA layer (SPLIT: h @ B.T
    as _parts_dot)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, RANK)
    h = tl.load(H + rm[:, None] * stride_hm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    b_t = tl.load(B + rn[None, :] * R + rr[:, None], mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
    if SPLIT:
        h1, h2, h3 = _parts(h)
        b1, b2, b3 = _parts(b_t)
        update = _parts_dot(h1, h2, h3, b1, b2, b3, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION,
                            BF16_DOT)
    else:
        update = tl.dot(h, b_t, input_precision=PRECISION)
    update = update * scaling
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    base = tl.load(BASE + rm[:, None] * stride_bm + rn[None, :], mask=mask, other=0.0)
    dtype = OUT.dtype.element_ty
    if ROUND_UPDATE:
        update = update.to(dtype).to(tl.float32)
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :], (base.to(tl.float32) + update).to(dtype), mask=mask)


def _tiles(r: int) -> tuple[int, int, int]:
    """(RANK: the rank padded for tl.dot, the long side of a tile next to a [*, RANK] fp32 operand (~32 KB of it),
    warps: twice as many above rank 32 for the [BLOCK_M, RANK] fp32 accumulators)."""
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"lora kernels: rank {r} is not in 1 .. {MAX_RANK}")
    rank = max(16, next_power_of_2(r))
    return rank, max(16, min(128, 8192 // rank)), 4 if rank <= 32 else 8


def _partitions(blocks: int, length: int, block: int, like: torch.Tensor, most: int = 1 << 30) -> tuple[int, int]:
    """(parts, elements per part) for a reduction of ``length`` split so that ``blocks`` x parts programs give every
    SM a few (at most ``most`` parts); each part a whole number of blocks."""
    wanted = max(1, min(most, cdiv(persistent_programs(like), blocks)))
    per = cdiv(cdiv(length, min(wanted, cdiv(length, block))), block) * block
    return cdiv(length, per), per


def _precision(t: torch.Tensor) -> str:
    """For products of bf16- or fp16-representable values (exact at tf32)."""
    return "tf32" if t.is_cuda else "ieee"  # the interpreter's fp32 dot is exact already


def _fp32_dot_precision(t: torch.Tensor) -> str:
    """For fp32 x fp32 products: tf32x3 on the tensor cores, not CUDA-core FMAs (module docstring), unless they are
    split into bf16 parts (SPLIT_FP32_DOTS)."""
    return _precision(t) if SPLIT_FP32_DOTS else "tf32x3" if t.is_cuda else "ieee"


def _bf16_dot(t: torch.Tensor) -> bool:
    """Exact-split dots with bf16 operands: for bf16 activations on a GPU (fp16 values need the split parts' range
    in fp32; the interpreter's bf16 dot is not exact)."""
    return t.is_cuda and t.dtype == torch.bfloat16


def _row_sum(w: torch.Tensor, y: torch.Tensor, scaling: float, stages: int, transposed: bool = False,
             tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """(w.T @ y) * scaling, a sum over the rows, split into partitions: fp32 [R, C], or its transpose [C, R]
    (contiguous, written so by the kernel: no transposing copy). tile: (BLOCK_M, BLOCK_C, warps), else _tiles'."""
    (m, c), r = y.shape, w.shape[1]
    rank, block_c, warps = _tiles(r)
    block_m, block_c, warps = tile or (BLOCK_M, block_c, warps)
    parts, rows = _partitions(cdiv(c, block_c), m, block_m, y)
    partial = torch.empty((parts, c, r) if transposed else (parts, r, c), dtype=torch.float32, device=y.device)
    _row_sum_kernel[(cdiv(c, block_c), parts)](
        w, y, partial, m, r, c, rows, float(scaling), w.stride(0), y.stride(0), y.stride(1),
        *((1, r) if transposed else (c, 1)), BLOCK_M=block_m, BLOCK_C=block_c, RANK=rank, PRECISION=_precision(y),
        BF16_DOT=_bf16_dot(y), STAGES=stages, num_warps=warps)
    return partial.sum(0)


def lora_shrink_fwd(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16), A [R, K] fp32 -> x.to(fp32) @ A.T, fp32 [M, R]."""
    (m, k), r = x.shape, a.shape[0]
    rank = _tiles(r)[0]
    block_m, block_k, warps = SHRINK_FWD_TILE
    parts, chunk = _partitions(cdiv(m, block_m), k, block_k, x)
    partial = torch.empty((parts, m, r), dtype=torch.float32, device=x.device)
    with on_device(x):
        _shrink_fwd_kernel[(cdiv(m, block_m), parts)](
            x, a, partial, m, r, x.stride(0), K=k, K_CHUNK=chunk, BLOCK_M=block_m, BLOCK_K=block_k, RANK=rank,
            PRECISION=_precision(x), BF16_DOT=_bf16_dot(x), num_warps=warps)
    return partial.sum(0)


def shrink_dx(dh: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """dh [M, R] fp32 @ A [R, K] fp32 -> dx [M, K] in x's dtype: x's gradient in lora_shrink's backward."""
    (m, k), r = x.shape, a.shape[0]
    rank, block_k, warps = _tiles(r)
    block_m, block_k, warps = WIDE_DX_TILE if rank > 32 else (BLOCK_M, block_k, warps)
    dx = torch.empty((m, k), dtype=x.dtype, device=x.device)
    # SHRINK_DX_PERSISTENT: a few programs per SM, each loading its rows of dh once; else one tile each
    chunk = _partitions(cdiv(m, block_m), k, block_k, x)[1] if SHRINK_DX_PERSISTENT else block_k
    with on_device(x):
        _shrink_dx_kernel[(cdiv(m, block_m), cdiv(k, chunk))](
            dh, a, dx, m, r, chunk, dh.stride(0), dx.stride(0), K=k, BLOCK_M=block_m, BLOCK_K=block_k, RANK=rank,
            PRECISION=_fp32_dot_precision(x), STAGES=SHRINK_BWD_STAGES,
            SPLIT=SPLIT_FP32_DOTS, BF16_DOT=x.is_cuda, num_warps=warps)
    return dx


def lora_shrink_bwd(dh: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
    """(dx in x's dtype, dA fp32 [R, K]) of lora_shrink_fwd."""
    dx = shrink_dx(dh, x, a)
    with on_device(x):
        return dx, _row_sum(dh, x, 1.0, SHRINK_BWD_STAGES, tile=WIDE_DA_TILE if _tiles(a.shape[0])[0] > 32 else None)


def lora_expand_fwd(base: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float,
                    round_update: bool) -> torch.Tensor:
    """base [M, N] (bf16/fp16), h [M, R] fp32, B [N, R] fp32 -> round(base + (h @ B.T) * scaling) in base's dtype
    (``round_update``: the update is rounded to that dtype before the add)."""
    (m, n), r = base.shape, b.shape[1]
    rank, block_n, warps = _tiles(r)
    out = torch.empty((m, n), dtype=base.dtype, device=base.device)
    with on_device(base):
        _expand_fwd_kernel[(cdiv(m, BLOCK_M), cdiv(n, block_n))](
            base, h, b, out, m, n, r, float(scaling), base.stride(0), h.stride(0), out.stride(0), BLOCK_M=BLOCK_M,
            BLOCK_N=block_n, RANK=rank, ROUND_UPDATE=round_update, PRECISION=_fp32_dot_precision(base),
            SPLIT=SPLIT_FP32_DOTS, BF16_DOT=base.is_cuda, num_warps=warps)
    return out


def lora_expand_bwd(dy: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float):
    """(dh fp32 [M, R], dB fp32 [N, R]) of lora_expand_fwd from dy [M, N]; the base's gradient is dy itself.
    Up to rank FUSED_BWD_MAX_RANK one pass over dy gives both; above, its partial sums of dh (one [M, rank] per
    BLOCK_N columns) would outweigh the second read of dy that they save, and each gradient is a pass of its own."""
    (m, n), r = dy.shape, b.shape[1]
    rank = _tiles(r)[0]
    with on_device(dy):
        if rank > FUSED_BWD_MAX_RANK:
            return (_row_sum(b, dy.t(), scaling, EXPAND_BWD_STAGES, True),
                    _row_sum(h, dy, scaling, EXPAND_BWD_STAGES, True))
        column_blocks = cdiv(n, EXPAND_BWD_BLOCK_N)
        # dB's partial sums (parts x [N, rank] fp32) kept within an eighth of dy's bytes
        parts, rows = _partitions(column_blocks, m, EXPAND_BWD_BLOCK_M, dy, most=max(1, m // (16 * rank)))
        dh = torch.empty((column_blocks, m, r), dtype=torch.float32, device=dy.device)
        db = torch.empty((parts, n, r), dtype=torch.float32, device=dy.device)
        _expand_bwd_kernel[(column_blocks, parts)](
            dy, h, b, dh, db, m, n, r, rows, float(scaling), dy.stride(0), h.stride(0), BLOCK_M=EXPAND_BWD_BLOCK_M,
            BLOCK_N=EXPAND_BWD_BLOCK_N, RANK=rank, PRECISION=_precision(dy), BF16_DOT=_bf16_dot(dy),
            STAGES=EXPAND_BWD_STAGES, num_warps=EXPAND_BWD_WARPS)
        return dh.sum(0), db.sum(0)
