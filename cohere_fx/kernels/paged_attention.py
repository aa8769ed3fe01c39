"""Paged-attention decode (one query token per sequence), split-K ("flash-decoding").

Why split-K: at decode a sequence has one query row, so one program per (sequence, kv head) leaves most SMs idle
when the batch is small and the context long. Each sequence's attended range is cut into ``num_partitions``
pieces processed in parallel; each piece writes its unnormalised output with its running max and sum, and a
second kernel combines them (``exp2(m_p - M)`` weights). With one partition the first kernel writes the final
output and the second is skipped.

GQA without repeat_kv: a program owns one kv head and the ``H / Hkv`` query heads that read it, so every page is
loaded once per group. Those query heads are the rows of a ``tl.dot`` (padded to 16, the MMA minimum); K/V tiles
of ``TILE_N`` tokens are gathered through the block table one token row at a time. Softmax statistics in fp32,
in base 2 (the scale is folded with log2(e)).
"""
import torch
import triton
import triton.language as tl

from cohere_fx.kernels import cdiv, next_power_of_2, sm_count

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_partial(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, o_ptr, m_ptr, l_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kn, stride_kt, stride_kh, stride_kd,
    stride_vn, stride_vt, stride_vh, stride_vd,
    stride_tb, stride_tm,
    qk_scale, window, num_parts,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)

    seq_len = tl.load(lens_ptr + b)
    start = 0
    if window > 0:
        start = tl.maximum(seq_len - window, 0)
    # partition lengths follow each sequence's own length, rounded to whole tiles
    part_len = tl.cdiv(tl.cdiv(seq_len - start, num_parts), TILE_N) * TILE_N
    lo = start + part * part_len
    hi = tl.minimum(lo + part_len, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table_row = table_ptr + b * stride_tb
    # Latency is hidden by pipelining the tiles (STAGES deep), and V is loaded next to K so both requests are in
    # flight together. (Under Triton 3.6's interpreter this runtime-bounded loop needs numpy < 2.4:
    # triton-lang/triton#9171.)
    for t0 in tl.range(lo, hi, TILE_N, num_stages=STAGES):
        tok = t0 + tl.arange(0, TILE_N)
        valid = tok < hi
        block = tl.load(table_row + (tok // BLOCK_SIZE) * stride_tm, mask=valid, other=0).to(tl.int64)
        slot = tok % BLOCK_SIZE
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + (block * stride_kn + slot * stride_kt + kvh * stride_kh)[:, None] + d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (block * stride_vn + slot * stride_vt + kvh * stride_vh)[:, None] + d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    row = b * NUM_HEADS + heads  # outputs are contiguous [B, H, (P,) D]
    if FINAL:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty sequence gives 0, not nan
        tl.store(o_ptr + row[:, None] * HEAD_DIM + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=g_mask[:, None] & d_mask[None, :])
    else:
        prow = row * num_parts + part
        tl.store(o_ptr + prow[:, None] * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(m_ptr + prow, m_i, mask=g_mask)
        tl.store(l_ptr + prow, l_i, mask=g_mask)


@triton.jit
def _paged_attention_reduce(
    o_part_ptr, m_ptr, l_ptr, out_ptr, num_parts,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, P_PAD: tl.constexpr,
):
    row = tl.program_id(0)  # b * H + h
    p = tl.arange(0, P_PAD)
    d = tl.arange(0, D_PAD)
    p_mask = p < num_parts
    m = tl.load(m_ptr + row * num_parts + p, mask=p_mask, other=float("-inf"))
    l = tl.load(l_ptr + row * num_parts + p, mask=p_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every partition empty: weights 0, output 0
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l, 0)
    o = tl.load(o_part_ptr + (row * num_parts + p)[:, None] * HEAD_DIM + d[None, :],
                mask=p_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def _num_sms(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else 2  # the interpreter (its tests pass `parts` for splits)


# Launch settings, swept on an H100 by benchmarks/sweep_paged_attention.py
# (benchmarks/results/sweep-paged_attention-h100-20261206T1243.txt; TILE_N = None: ``tile_width`` decides): one
# program per SM with its tile loop pipelined three deep. Against the earlier 8 unpipelined programs per SM
# (benchmarks/results/sweep-paged_attention-20261125.txt): 16 x 640 16.3 vs 22.6 us (the r7b decode engine's
# B16 contexts), 16 x 4096 96.7 vs 102.8 us (2.78 TB/s), 64 x 2112 189.9 vs 208.5 us; 1 x 640 (64-token tiles)
# 5.9 vs 5.3 us.
PROGRAMS_PER_SM = 1
NUM_WARPS = 4
TILE_N = None
STAGES = 3


def tile_width(batch: int, kv_heads: int, max_tokens: int, device: torch.device) -> int:
    """128-token tiles (fewer, longer loads: 2.61 TB/s at 16 x 4096 on an H100, 64-token tiles 2.49) when they
    still give every SM ~4 programs; else 64, so that short contexts at small batch keep the SMs busy (1 x 640:
    5.3 us with 64, 5.8 us with 128)."""
    if TILE_N:
        return TILE_N
    return 128 if batch * kv_heads * cdiv(max_tokens, 128) >= 4 * _num_sms(device) else 64


def num_partitions(batch: int, kv_heads: int, max_tokens: int, device: torch.device, tile_n: int = 64) -> int:
    """About PROGRAMS_PER_SM (sequence, kv head, partition) programs per SM: with the tile loop pipelined
    (STAGES), one program per SM keeps its loads in flight, and fewer partitions leave less to combine; never more
    partitions than tiles."""
    wanted = cdiv(PROGRAMS_PER_SM * _num_sms(device), batch * kv_heads)
    return max(1, min(wanted, cdiv(max_tokens, tile_n), 128))


def paged_attention_fwd(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, window: int, parts: int | None = None, tile_n: int | None = None,
) -> torch.Tensor:
    """q ``[B, H, D]``, pools ``[num_blocks, block_size, Hkv, D]``, block_tables ``[B, max_blocks]`` int32,
    seq_lens ``[B]`` int32 -> ``[B, H, D]`` in q's dtype. ``parts`` overrides the partition count."""
    batch, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_pool.shape
    max_tokens = block_tables.shape[1] * block_size
    if window > 0:
        max_tokens = min(max_tokens, window)
    tile_n = tile_n or tile_width(batch, kv_heads, max_tokens, q.device)
    if parts is None:
        parts = num_partitions(batch, kv_heads, max_tokens, q.device, tile_n)
    group = num_heads // kv_heads
    d_pad = max(16, next_power_of_2(head_dim))
    out = torch.empty(batch, num_heads, head_dim, device=q.device, dtype=q.dtype)
    if parts == 1:
        o_part = m_part = l_part = out  # m/l unused by the FINAL variant
    else:
        o_part = torch.empty(batch, num_heads, parts, head_dim, device=q.device, dtype=torch.float32)
        m_part = torch.empty(batch, num_heads, parts, device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
    _paged_attention_partial[(batch, kv_heads, parts)](
        q, k_pool, v_pool, block_tables, seq_lens, o_part, m_part, l_part,
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *block_tables.stride(),
        scale * _LOG2E, window, parts,
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, TILE_N=tile_n, FINAL=parts == 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # no tf32 rounding for fp32 caches
        STAGES=STAGES, num_warps=NUM_WARPS,
    )
    if parts > 1:
        _paged_attention_reduce[(batch * num_heads,)](
            o_part, m_part, l_part, out, parts,
            HEAD_DIM=head_dim, D_PAD=d_pad, P_PAD=max(2, next_power_of_2(parts)), num_warps=4,
        )
    return out
