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
- An fp32 x bf16 product (``x @ A.T`` forward, ``dh.T @ x`` for A's gradient) runs on the tensor cores: the fp32
  operand is split into three bf16-representable parts that sum to it exactly (``_exact_dot``), and
  bf16-representable values multiply exactly under tf32 (and under the interpreter's fp32), so each partial
  product is exact.
- fp32 x fp32 products with the rank as their short side (``h @ B.T``, ``dh @ A``, the gradient passes of B) run
  on the tensor cores as tf32x3: Triton splits each fp32 operand into a tf32 part and a tf32 remainder and sums
  three products, leaving ~2^-22 relative error per product, the size of fp32 rounding itself (IEEE dots under the
  interpreter). As IEEE dots (CUDA-core FMAs) ``dh @ A`` alone took 31 ms of a 125 ms H100 LoRA step and the
  gradient passes 11.5 ms (benchmarks/results/train-lora-r7b-8L-20261206T031500Z.json).
- Rounding points are PEFT's: ``(h @ B.T) * scaling`` is rounded in fp32, added to the base in fp32 and rounded
  once to its dtype (bitsandbytes' 4-bit layers round the update to the dtype before the add: ``ROUND_UPDATE``).
  The output gradient is ``dy.float() * scaling``, as autograd computes it there.

Long reductions (over the tokens for A's and B's gradients, over the output features for ``dh``) are split into
partitions that write fp32 partial sums, added afterwards in a fixed order: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from cohere_fx.kernels import on_device, persistent_programs

MAX_RANK = 128  # the rank (or the sum of the ranks of fused A matrices) that one tile holds
BLOCK_M = 64  # tiles (with _tiles): not yet swept on a GPU


@triton.jit
def _exact_dot(lhs, rhs, acc, SPLIT_RHS: tl.constexpr, PRECISION: tl.constexpr):
    """acc + lhs @ rhs where one operand is fp32 and the other's values are bf16-representable: the fp32 one
    (rhs if SPLIT_RHS else lhs) is split into three bf16-representable parts that sum to it exactly, so that
    every partial product is exact at any dot precision that keeps bf16 mantissas (tf32, ieee)."""
    full = rhs if SPLIT_RHS else lhs
    part = full.to(tl.bfloat16).to(tl.float32)
    for _ in tl.static_range(3):
        if SPLIT_RHS:
            acc = tl.dot(lhs, part, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(part, rhs, acc, input_precision=PRECISION)
        full = full - part  # exact: part is full rounded to 8 significant bits
        part = full.to(tl.bfloat16).to(tl.float32)  # the third time, full has at most 8 bits left: part == full
    return acc


@triton.jit
def _shrink_fwd_kernel(X, A, PART, M, R, stride_xm, K: tl.constexpr, K_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, RANK: tl.constexpr, PRECISION: tl.constexpr):
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
        acc = _exact_dot(x.to(tl.float32), a_t, acc, True, PRECISION)
    tl.store(PART + (s * M + rm[:, None]) * R + rr[None, :], acc, mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _shrink_dx_kernel(DH, A, DX, M, R, stride_dhm, stride_dxm, K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr, RANK: tl.constexpr, PRECISION: tl.constexpr):
    """dx[M, K] = dh[M, R] @ A[R, K], rounded to dx's dtype (PEFT's cast of x to fp32, differentiated)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, RANK)
    dh = tl.load(DH + rm[:, None] * stride_dhm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    a = tl.load(A + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    dx = tl.dot(dh, a, input_precision=PRECISION)
    tl.store(DX + rm[:, None] * stride_dxm + rk[None, :], dx.to(DX.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _row_sum_kernel(W, Y, PART, M, R, C, rows, scaling, stride_wm, stride_ym, stride_yc, stride_pr, stride_pc,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RANK: tl.constexpr, EXACT_SPLIT: tl.constexpr,
                    PRECISION: tl.constexpr):
    """PART[p] ([R, C], or [C, R] through the strides) = w[rows of partition p].T @ (y * scaling)[those rows],
    w [M, R] fp32, y [M, C] (any strides), summed over p afterwards. A's gradient: w = dh, y = x over the tokens
    (bf16-representable: EXACT_SPLIT on the tensor cores); B's, transposed: w = h, y = dy over the tokens; h's,
    transposed: w = B, y = dy.T over the output features (dy scaled in fp32: fp32 x fp32 dots at PRECISION)."""
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1)
    rr = tl.arange(0, RANK)
    acc = tl.zeros((RANK, BLOCK_C), dtype=tl.float32)
    m0 = p * rows
    m_end = tl.minimum(m0 + rows, M)
    # A while loop: Triton 3.6's interpreter cannot take a runtime range bound under numpy >= 2.4
    # (triton-lang/triton#9171)
    while m0 < m_end:
        m = m0 + tl.arange(0, BLOCK_M)
        w_t = tl.load(W + m[None, :] * stride_wm + rr[:, None], mask=(m[None, :] < m_end) & (rr[:, None] < R),
                      other=0.0)
        y = tl.load(Y + m[:, None] * stride_ym + rc[None, :] * stride_yc,
                    mask=(m[:, None] < m_end) & (rc[None, :] < C), other=0.0).to(tl.float32)
        if EXACT_SPLIT:
            acc = _exact_dot(w_t, y, acc, False, PRECISION)
        else:
            acc = tl.dot(w_t, y * scaling, acc, input_precision=PRECISION)
        m0 += BLOCK_M
    tl.store(PART + p * R * C + rr[:, None] * stride_pr + rc[None, :] * stride_pc, acc,
             mask=(rr[:, None] < R) & (rc[None, :] < C))


@triton.jit
def _expand_fwd_kernel(BASE, H, B, OUT, M, N, R, scaling, stride_bm, stride_hm, stride_om, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, RANK: tl.constexpr, ROUND_UPDATE: tl.constexpr,
                       PRECISION: tl.constexpr):
    """out[M, N] = round(base + round?((h @ B.T) * scaling)), the fp32 math of PEFT's LoRA layer."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, RANK)
    h = tl.load(H + rm[:, None] * stride_hm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    b_t = tl.load(B + rn[None, :] * R + rr[:, None], mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
    update = tl.dot(h, b_t, input_precision=PRECISION) * scaling
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
    rank = max(16, triton.next_power_of_2(r))
    return rank, max(16, min(128, 8192 // rank)), 4 if rank <= 32 else 8


def _partitions(blocks: int, length: int, block: int, like: torch.Tensor) -> tuple[int, int]:
    """(parts, elements per part) for a reduction of ``length`` split so that ``blocks`` x parts programs give every
    SM a few; each part a whole number of blocks."""
    wanted = max(1, triton.cdiv(persistent_programs(like), blocks))
    per = triton.cdiv(triton.cdiv(length, min(wanted, triton.cdiv(length, block))), block) * block
    return triton.cdiv(length, per), per


def _precision(t: torch.Tensor) -> str:
    """For products of bf16-representable values (exact at tf32)."""
    return "tf32" if t.is_cuda else "ieee"  # the interpreter's fp32 dot is exact already


def _fp32_precision(t: torch.Tensor) -> str:
    """For fp32 x fp32 products: tf32x3 on the tensor cores, not CUDA-core FMAs (module docstring)."""
    return "tf32x3" if t.is_cuda else "ieee"


def _row_sum(w: torch.Tensor, y: torch.Tensor, scaling: float, exact_split: bool,
             transposed: bool = False) -> torch.Tensor:
    """w.T @ (y * scaling), a sum over the rows, split into partitions: fp32 [R, C], or its transpose [C, R]
    (contiguous, written so by the kernel: no transposing copy)."""
    (m, c), r = y.shape, w.shape[1]
    rank, block_c, warps = _tiles(r)
    parts, rows = _partitions(triton.cdiv(c, block_c), m, BLOCK_M, y)
    partial = torch.empty((parts, c, r) if transposed else (parts, r, c), dtype=torch.float32, device=y.device)
    _row_sum_kernel[(triton.cdiv(c, block_c), parts)](
        w, y, partial, m, r, c, rows, float(scaling), w.stride(0), y.stride(0), y.stride(1),
        *((1, r) if transposed else (c, 1)), BLOCK_M=BLOCK_M, BLOCK_C=block_c, RANK=rank, EXACT_SPLIT=exact_split,
        PRECISION=_precision(y) if exact_split else _fp32_precision(y), num_warps=warps)
    return partial.sum(0)


def lora_shrink_fwd(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16), A [R, K] fp32 -> x.to(fp32) @ A.T, fp32 [M, R]."""
    (m, k), r = x.shape, a.shape[0]
    rank, block_k, warps = _tiles(r)
    parts, chunk = _partitions(triton.cdiv(m, BLOCK_M), k, block_k, x)
    partial = torch.empty((parts, m, r), dtype=torch.float32, device=x.device)
    with on_device(x):
        _shrink_fwd_kernel[(triton.cdiv(m, BLOCK_M), parts)](
            x, a, partial, m, r, x.stride(0), K=k, K_CHUNK=chunk, BLOCK_M=BLOCK_M, BLOCK_K=block_k, RANK=rank,
            PRECISION=_precision(x), num_warps=warps)
    return partial.sum(0)


def lora_shrink_bwd(dh: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
    """(dx in x's dtype, dA fp32 [R, K]) of lora_shrink_fwd."""
    (m, k), r = x.shape, a.shape[0]
    rank, block_k, warps = _tiles(r)
    dx = torch.empty((m, k), dtype=x.dtype, device=x.device)
    with on_device(x):
        _shrink_dx_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(k, block_k))](
            dh, a, dx, m, r, dh.stride(0), dx.stride(0), K=k, BLOCK_M=BLOCK_M, BLOCK_K=block_k, RANK=rank,
            PRECISION=_fp32_precision(x), num_warps=warps)
        return dx, _row_sum(dh, x, 1.0, True)


def lora_expand_fwd(base: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float,
                    round_update: bool) -> torch.Tensor:
    """base [M, N] (bf16/fp16), h [M, R] fp32, B [N, R] fp32 -> round(base + (h @ B.T) * scaling) in base's dtype
    (``round_update``: the update is rounded to that dtype before the add)."""
    (m, n), r = base.shape, b.shape[1]
    rank, block_n, warps = _tiles(r)
    out = torch.empty((m, n), dtype=base.dtype, device=base.device)
    with on_device(base):
        _expand_fwd_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(n, block_n))](
            base, h, b, out, m, n, r, float(scaling), base.stride(0), h.stride(0), out.stride(0), BLOCK_M=BLOCK_M,
            BLOCK_N=block_n, RANK=rank, ROUND_UPDATE=round_update, PRECISION=_fp32_precision(base), num_warps=warps)
    return out


def lora_expand_bwd(dy: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float):
    """(dh fp32 [M, R], dB fp32 [N, R]) of lora_expand_fwd from dy [M, N]; the base's gradient is dy itself."""
    with on_device(dy):
        return _row_sum(b, dy.t(), scaling, False, True), _row_sum(h, dy, scaling, False, True)
