"""QK-norm + interleaved RoPE + the [B, S, H, D] -> [B, H, S, D] transpose in one Triton pass, fwd and bwd.

Why one kernel: HF spells this as a norm (fp32 copy, ~10 elementwise/reduction ops), a transpose, and a RoPE
that upcasts q and k to fp32 again, each op a pass over q and k in eager mode. Here each program reads one
token's heads once (from any view of the projection output whose last dim is contiguous) and writes them
once, already in the [B, H, S, D] layout SDPA reads. The roundings of HF are kept: the norm
output is rounded to the activation dtype before RoPE upcasts it, and cos/sin are read in their own dtype.

Layout of the work: program (token, head block); the head blocks of q come first, then those of k, so one
launch covers both. A tile is [BLOCK_H, D] with the whole head in registers, so the two-pass variance costs no
extra traffic. RoPE pairs (2i, 2i+1) are adjacent in memory: the tile is reshaped to [BLOCK_H, D/2, 2] and split,
which keeps loads and stores contiguous and vectorised. cos and sin are used element for element (cos[2i] for
element 2i, cos[2i+1] for element 2i+1), as HF does, so nothing assumes cos[2i] == cos[2i+1].

The backward recomputes the norm statistics from the saved input. dw is a sum over all tokens: each backward
program walks a block of tokens, accumulates its heads' dw in fp32 registers and writes one partial row; the
partial rows are summed afterwards (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from cohere_fx.kernels import cdiv, next_power_of_2, on_device, persistent_programs

# Elements of one [BLOCK_H, D] fp32 tile: enough bytes in flight per program, few registers per thread at 4 warps.
TILE_ELEMENTS = 2048
# Measured with benchmarks/sweep_qk_norm_rope.py on an H100 (r7b-8L, B4xS2048): fwd 4 warps ~ 2.5 TB/s; the
# backward, which keeps more fp32 rows live, is 13 % faster with 8 warps than with 4.
NUM_WARPS = 4
BWD_NUM_WARPS = 8
MAX_HEAD_DIM = 256


@triton.jit
def _pairs(t, BLOCK_H: tl.constexpr, D: tl.constexpr):
    """[BLOCK_H, D] -> (even, odd) halves, each [BLOCK_H, D // 2]."""
    return tl.split(tl.reshape(t, (BLOCK_H, D // 2, 2)))


@triton.jit
def _cos_sin(COS, SIN, row, D: tl.constexpr):
    """cos and sin of one token as (cos_even, cos_odd, sin_even, sin_odd), each [1, D // 2] fp32."""
    cols = tl.arange(0, D)
    c_even, c_odd = _pairs(tl.load(COS + row + cols).to(tl.float32)[None, :], 1, D)
    s_even, s_odd = _pairs(tl.load(SIN + row + cols).to(tl.float32)[None, :], 1, D)
    return c_even, c_odd, s_even, s_odd


@triton.jit
def _fwd_heads(X, stride_xh, OUT, stride_oh, W, n_heads, h0, c_even, c_odd, s_even, s_odd, eps,
               HAS_NORM: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    h = h0 + tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = (h < n_heads) & (d < D)
    x = tl.load(X + h * stride_xh + d, mask=mask, other=0.0)
    t = x.to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(t, axis=1) / D
        xc = t - mean[:, None]
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        w = tl.load(W + h * D + d, mask=mask, other=0.0).to(tl.float32)
        t = (w * (xc * rstd[:, None])).to(x.dtype).to(tl.float32)
    t_even, t_odd = _pairs(t, BLOCK_H, D)
    out_even = t_even * c_even - t_odd * s_even
    out_odd = t_odd * c_odd + t_even * s_odd
    out = tl.reshape(tl.join(out_even, out_odd), (BLOCK_H, D))
    tl.store(OUT + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(Q, K, COS, SIN, QW, KW, QO, KO, S, H, HK,
                             stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                             stride_cb, stride_cs, eps, q_blocks,
                             HAS_NORM: tl.constexpr, D: tl.constexpr,
                             BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = tok // S
    s = tok - b * S
    c_even, c_odd, s_even, s_odd = _cos_sin(COS, SIN, b * stride_cb + s * stride_cs, D)
    if blk < q_blocks:
        _fwd_heads(Q + b * stride_qb + s * stride_qs, stride_qh, QO + (b * H * S + s) * D, S * D, QW, H,
                   blk * BLOCK_HQ, c_even, c_odd, s_even, s_odd, eps, HAS_NORM, D, BLOCK_HQ)
    else:
        _fwd_heads(K + b * stride_kb + s * stride_ks, stride_kh, KO + (b * HK * S + s) * D, S * D, KW, HK,
                   (blk - q_blocks) * BLOCK_HK, c_even, c_odd, s_even, s_odd, eps, HAS_NORM, D, BLOCK_HK)


@triton.jit
def _bwd_heads(DO, stride_dob, stride_doh, stride_dos, X, stride_xb, stride_xs, stride_xh, DX, W, DW_PARTIAL,
               COS, SIN, stride_cb, stride_cs, n_tokens, S, n_heads, h0, row_start, rows, eps,
               HAS_NORM: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    h = h0 + tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = (h < n_heads) & (d < D)
    if HAS_NORM:
        w = tl.load(W + h * D + d, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    tok = row_start.to(tl.int64)
    row_end = tl.minimum(row_start + rows, n_tokens)
    # A while loop, not range(): Triton 3.6's interpreter cannot take a runtime range bound under numpy >= 2.4
    # (triton-lang/triton#9171); compiled, both forms are alike (nothing here feeds a tl.dot to pipeline).
    while tok < row_end:
        b = tok // S
        s = tok - b * S
        c_even, c_odd, s_even, s_odd = _cos_sin(COS, SIN, b * stride_cb + s * stride_cs, D)
        g = tl.load(DO + b * stride_dob + s * stride_dos + h * stride_doh + d, mask=mask, other=0.0)
        g_even, g_odd = _pairs(g.to(tl.float32), BLOCK_H, D)
        # Transpose of the rotation: out[2i] = x[2i] c - x[2i+1] s, out[2i+1] = x[2i+1] c + x[2i] s.
        dt_even = g_even * c_even + g_odd * s_odd
        dt_odd = g_odd * c_odd - g_even * s_even
        dt = tl.reshape(tl.join(dt_even, dt_odd), (BLOCK_H, D))
        if HAS_NORM:
            # HF's norm output is in the activation dtype, so the gradient reaching the norm is too.
            dy = dt.to(DX.dtype.element_ty).to(tl.float32)
            x = tl.load(X + b * stride_xb + s * stride_xs + h * stride_xh + d, mask=mask, other=0.0)
            x = x.to(tl.float32)
            mean = tl.sum(x, axis=1) / D
            xc = x - mean[:, None]
            rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
            xhat = xc * rstd[:, None]
            wg = w * dy
            mean_wg = tl.sum(wg, axis=1) / D
            mean_wgx = tl.sum(wg * xhat, axis=1) / D
            dt = rstd[:, None] * (wg - mean_wg[:, None] - xhat * mean_wgx[:, None])
            dw += dy * xhat
        tl.store(DX + tok * n_heads * D + h * D + d, dt.to(DX.dtype.element_ty), mask=mask)
        tok += 1
    if HAS_NORM:
        tl.store(DW_PARTIAL + h * D + d, dw, mask=mask)


@triton.jit
def _qk_norm_rope_bwd_kernel(DQO, DKO, Q, K, COS, SIN, QW, KW, DQ, DK, DQW_PARTIAL, DKW_PARTIAL,
                             n_tokens, S, H, HK, rows,
                             stride_dqb, stride_dqh, stride_dqs, stride_dkb, stride_dkh, stride_dks,
                             stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                             stride_cb, stride_cs, eps, q_blocks,
                             HAS_NORM: tl.constexpr, D: tl.constexpr,
                             BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    row_start = pid * rows
    if blk < q_blocks:
        _bwd_heads(DQO, stride_dqb, stride_dqh, stride_dqs, Q, stride_qb, stride_qs, stride_qh, DQ, QW,
                   DQW_PARTIAL + pid.to(tl.int64) * H * D, COS, SIN, stride_cb, stride_cs, n_tokens, S, H,
                   blk * BLOCK_HQ, row_start, rows, eps, HAS_NORM, D, BLOCK_HQ)
    else:
        _bwd_heads(DKO, stride_dkb, stride_dkh, stride_dks, K, stride_kb, stride_ks, stride_kh, DK, KW,
                   DKW_PARTIAL + pid.to(tl.int64) * HK * D, COS, SIN, stride_cb, stride_cs, n_tokens, S, HK,
                   (blk - q_blocks) * BLOCK_HK, row_start, rows, eps, HAS_NORM, D, BLOCK_HK)


def kernel_supports(head_dim: int) -> bool:
    """Head dims the kernel handles: a power of two (one register tile per head), 2..MAX_HEAD_DIM."""
    return 2 <= head_dim <= MAX_HEAD_DIM and head_dim & (head_dim - 1) == 0


def _block_heads(n_heads: int, head_dim: int) -> int:
    return min(next_power_of_2(n_heads), max(1, TILE_ELEMENTS // head_dim))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"qk_norm_rope: q, k must be [B, S, heads, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    (b, s, _, d), (bk, sk, _, dk) = q.shape, k.shape
    if (bk, sk, dk) != (b, s, d):
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in B, S or D")
    if not kernel_supports(d):
        raise ValueError(f"qk_norm_rope: head dim {d} is not a power of two in [2, {MAX_HEAD_DIM}]")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (s, d):
            raise ValueError(f"qk_norm_rope: {name} {tuple(t.shape)} is not [1 or {b}, {s}, {d}]")


def _cos_sin_strides(t: torch.Tensor) -> tuple[int, int]:
    # A batch of one broadcasts over B: stride 0 (expanded views already have it).
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


def _cos_sin_args(cos: torch.Tensor, sin: torch.Tensor):
    """cos, sin with unit last stride and one set of (batch, seq) strides for both."""
    cos, sin = _unit_last(cos), _unit_last(sin)
    if _cos_sin_strides(cos) != _cos_sin_strides(sin):
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, *_cos_sin_strides(cos)


def fwd_layout(q, k, q_weight, k_weight):
    """What a forward launch takes besides the tensors: (has_norm, q_weight, k_weight, BLOCK_HQ, BLOCK_HK, q head
    blocks, k head blocks); without a norm the weights are q and k, never read."""
    has_norm = q_weight is not None
    if has_norm:
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    else:
        q_weight, k_weight = q, k
    d = q.shape[-1]
    block_hq, block_hk = _block_heads(q.shape[2], d), _block_heads(k.shape[2], d)
    return (has_norm, q_weight, k_weight, block_hq, block_hk, cdiv(q.shape[2], block_hq),
            cdiv(k.shape[2], block_hk))


def _launch_fwd(q, k, cos, sin, q_weight, k_weight, eps):
    _check(q, k, cos, sin)
    q, k = _unit_last(q), _unit_last(k)
    cos, sin, stride_cb, stride_cs = _cos_sin_args(cos, sin)
    (b, s, h, d), hk = q.shape, k.shape[2]
    q_out = torch.empty((b, h, s, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, hk, s, d), dtype=q.dtype, device=q.device)
    if b * s == 0:
        return q_out, k_out
    has_norm, q_weight, k_weight, block_hq, block_hk, q_blocks, k_blocks = fwd_layout(q, k, q_weight, k_weight)
    grid = (b * s, q_blocks + k_blocks)
    with on_device(q):
        _qk_norm_rope_fwd_kernel[grid](q, k, cos, sin, q_weight, k_weight, q_out, k_out, s, h, hk,
                                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                       stride_cb, stride_cs, float(eps), q_blocks,
                                       HAS_NORM=has_norm, D=d, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, num_warps=NUM_WARPS)
    return q_out, k_out


def _launch_bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, eps):
    """dq, dk in [B, S, heads, D] (contiguous) and, with the norm, fp32 dw partial sums [programs, heads, D]."""
    b, h, s, d = dq_out.shape
    hk = dk_out.shape[1]
    has_norm = q_weight is not None
    dq = torch.empty((b, s, h, d), dtype=(q if has_norm else dq_out).dtype, device=dq_out.device)
    dk = torch.empty((b, s, hk, d), dtype=(k if has_norm else dk_out).dtype, device=dq_out.device)
    n_tokens = b * s
    if n_tokens == 0:
        zeros = (torch.zeros((1, n, d), dtype=torch.float32, device=dq.device) for n in (h, hk))
        return dq, dk, *(zeros if has_norm else (None, None))
    dq_out, dk_out = _unit_last(dq_out), _unit_last(dk_out)
    cos, sin, stride_cb, stride_cs = _cos_sin_args(cos, sin)
    if has_norm:
        # Many tokens per program, so that the partial dw rows (written, then summed) stay few.
        rows = cdiv(n_tokens, min(n_tokens, persistent_programs(dq)))
        programs = cdiv(n_tokens, rows)
        q, k = _unit_last(q), _unit_last(k)
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
        dqw = torch.empty((programs, h, d), dtype=torch.float32, device=dq.device)
        dkw = torch.empty((programs, hk, d), dtype=torch.float32, device=dq.device)
    else:  # nothing to accumulate: one token per program, as in the forward
        rows, programs = 1, n_tokens
        q, k, q_weight, k_weight, dqw, dkw = dq_out, dk_out, dq_out, dk_out, dq, dk  # never read or written
    block_hq, block_hk = _block_heads(h, d), _block_heads(hk, d)
    q_blocks = cdiv(h, block_hq)
    grid = (programs, q_blocks + cdiv(hk, block_hk))
    with on_device(dq):
        _qk_norm_rope_bwd_kernel[grid](dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, dq, dk,
                                       dqw, dkw, n_tokens, s, h, hk, rows,
                                       dq_out.stride(0), dq_out.stride(1), dq_out.stride(2),
                                       dk_out.stride(0), dk_out.stride(1), dk_out.stride(2),
                                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                       stride_cb, stride_cs, float(eps), q_blocks,
                                       HAS_NORM=has_norm, D=d, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, num_warps=BWD_NUM_WARPS)
    return dq, dk, dqw, dkw


def qk_norm_rope_fwd(q, k, cos, sin, q_weight, k_weight, eps: float):
    """HF's q_norm/k_norm, transpose(1, 2) and apply_rotary_pos_emb on q [B, S, H, D], k [B, S, Hk, D].

    cos, sin: [1 or B, S, D]; weights [H, D], [Hk, D]. Returns contiguous [B, H, S, D], [B, Hk, S, D] in q's dtype.
    """
    return _launch_fwd(q, k, cos, sin, q_weight, k_weight, eps)


def rope_fwd(q, k, cos, sin):
    """qk_norm_rope_fwd without the norm (Command R v01, Cohere2 sliding layers)."""
    return _launch_fwd(q, k, cos, sin, None, None, 0.0)


def qk_norm_rope_bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, eps: float):
    """(dq, dk, dq_weight, dk_weight) of qk_norm_rope_fwd; dq, dk as contiguous [B, S, heads, D] in the dtypes
    of q, k; weight grads summed in fp32 over B * S and returned in the weights' dtype."""
    _check(q, k, cos, sin)
    dq, dk, dqw, dkw = _launch_bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, eps)
    return dq, dk, dqw.sum(0).to(q_weight.dtype), dkw.sum(0).to(k_weight.dtype)


def rope_bwd(dq_out, dk_out, cos, sin):
    """(dq, dk) of rope_fwd from the output grads alone ([B, heads, S, D]); dq, dk as [B, S, heads, D]."""
    dq, dk, _, _ = _launch_bwd(dq_out, dk_out, None, None, cos, sin, None, None, 0.0)
    return dq, dk
