"""``rope_kv_write``: a decode step's QK-norm + RoPE (kernels/qk_norm_rope.py) that also stores the new token's
K and V into their page of the paged KV cache.

Why: after the RoPE kernel, the decode graph copied k (and v) into the pools with two ``index_put`` kernels per
layer: two more launches (and gaps) for 4 KB of data each. Here the programs that rotate k store it straight
into its page, and one more block of programs copies v there, so the RoPE launch is the layer's only one between
the projections and paged attention. One token per sequence (S = 1, a decode step); its flat pool row is
``slots[b]`` (``page * block_size + offset``), as ``PagedDecodeView`` writes it.
"""
import torch
import triton
import triton.language as tl

from cohere_fx.kernels import on_device
from cohere_fx.kernels.dependent_launch import dependent_launch, wait_for_inputs
from cohere_fx.kernels.qk_norm_rope import NUM_WARPS, _check, _cos_sin, _cos_sin_args, _fwd_heads, fwd_layout


@triton.jit
def _rope_kv_write_kernel(Q, K, V, COS, SIN, QW, KW, QO, K_POOL, V_POOL, SLOTS, H, HK,
                          stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                          stride_kpn, stride_kpt, stride_kph, stride_vpn, stride_vpt, stride_vph,
                          stride_cb, eps, block_size, q_blocks, k_blocks,
                          HAS_NORM: tl.constexpr, D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                          PDL: tl.constexpr):
    """Program (sequence b, head block): q blocks, then k blocks (rotated into the page), then v blocks
    (copied into the page)."""
    wait_for_inputs(PDL)
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    slot = tl.load(SLOTS + b)
    page = slot // block_size
    offset = slot - page * block_size
    c_even, c_odd, s_even, s_odd = _cos_sin(COS, SIN, b * stride_cb, D)
    if blk < q_blocks:
        _fwd_heads(Q + b * stride_qb, stride_qh, QO + b * H * D, D, QW, H, blk * BLOCK_HQ, c_even, c_odd, s_even,
                   s_odd, eps, HAS_NORM, D, BLOCK_HQ)
    elif blk < q_blocks + k_blocks:
        _fwd_heads(K + b * stride_kb, stride_kh, K_POOL + page * stride_kpn + offset * stride_kpt, stride_kph, KW,
                   HK, (blk - q_blocks) * BLOCK_HK, c_even, c_odd, s_even, s_odd, eps, HAS_NORM, D, BLOCK_HK)
    else:
        h = (blk - q_blocks - k_blocks) * BLOCK_HK + tl.arange(0, BLOCK_HK)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = (h < HK) & (d < D)
        v = tl.load(V + b * stride_vb + h * stride_vh + d, mask=mask, other=0.0)
        tl.store(V_POOL + page * stride_vpn + offset * stride_vpt + h * stride_vph + d,
                 v.to(V_POOL.dtype.element_ty), mask=mask)


def rope_kv_write_fwd(q, k, v, cos, sin, q_weight, k_weight, eps, k_pool, v_pool, slots):
    """q [B, 1, H, D], k [B, 1, Hk, D] (projection views, unit last stride), v [B, Hk, 1, D], cos/sin
    [1 or B, 1, D], norm weights [H, D], [Hk, D] (or None: RoPE alone), pools [pages, block_size, Hk, D] (unit
    last stride), slots [B] int64, all of one dtype -> q rotated as contiguous [B, H, 1, D]; k rotated and v
    written into the pools at ``slots``."""
    _check(q, k, cos, sin)
    (b, s, h, d), hk = q.shape, k.shape[2]
    if s != 1 or tuple(v.shape) != (b, hk, 1, d) or tuple(slots.shape) != (b,):
        raise ValueError(f"rope_kv_write: one token per sequence, q [B, 1, H, D], v [B, Hk, 1, D], slots [B]; got "
                         f"q {tuple(q.shape)}, v {tuple(v.shape)}, slots {tuple(slots.shape)}")
    for t in (q, k, v, k_pool, v_pool):
        if t.stride(-1) != 1 or t.dtype != q.dtype:
            raise ValueError(f"rope_kv_write: q's dtype {q.dtype} and unit last strides expected, got "
                             f"{t.dtype}{tuple(t.shape)} strides {t.stride()}")
    q_out = torch.empty((b, h, 1, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return q_out
    cos, sin, stride_cb, _ = _cos_sin_args(cos, sin)
    has_norm, q_weight, k_weight, block_hq, block_hk, q_blocks, k_blocks = fwd_layout(q, k, q_weight, k_weight)
    with on_device(q):
        _rope_kv_write_kernel[(b, q_blocks + 2 * k_blocks)](
            q, k, v, cos, sin, q_weight, k_weight, q_out, k_pool, v_pool, slots, h, hk,
            q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(1),
            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1),
            v_pool.stride(2), stride_cb, float(eps), k_pool.shape[1], q_blocks, k_blocks,
            HAS_NORM=has_norm, D=d, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, num_warps=NUM_WARPS,
            **dependent_launch(q))
    return q_out
