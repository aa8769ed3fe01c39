"""``cohere_fx::rope_kv_write``: a decode step's ``qk_norm_rope`` (or ``rope``) and the paged cache's K/V write of
the new token, as one op that mutates the pools.

Why an op: the write was two ``index_put`` kernels per layer after the RoPE kernel; the kernel
(kernels/rope_kv_write.py) stores k and v into their page from the RoPE launch itself. The op declares the pools
as mutated, so aot_autograd functionalizes it and inductor re-inplaces it on the pools, as it did the
``index_put`` (tests/test_decode_runner.py checks that no copy of a pool is made). Without inductor
(``inductor=False``, a debugging path) the functionalized op copies each pool it writes. Inference only.

Values: q as ``qk_norm_rope``/``rope`` returns it; the pools receive what the unfused graph stored, the rotated
k and the given v at position -1, at flat rows ``slots`` (``page * block_size + offset``).
"""
from typing import Optional

import torch
from torch import Tensor

from cohere_fx.ops.qk_norm_rope import _on_triton, qk_norm_rope_reference, rope_reference
from cohere_fx.runtime.paged_cache import write_rows


def rope_kv_write_reference(q, k, v, cos, sin, q_weight, k_weight, eps, k_pool, v_pool, slots) -> Tensor:
    if q_weight is None:
        q_out, k_out = rope_reference(q, k, cos, sin)
    else:
        q_out, k_out = qk_norm_rope_reference(q, k, cos, sin, q_weight, k_weight, eps)
    write_rows(k_pool, slots, k_out[:, :, -1])
    write_rows(v_pool, slots, v[:, :, -1])
    return q_out


def _check(q: Tensor, k: Tensor, v: Tensor, q_weight, k_weight, k_pool: Tensor, v_pool: Tensor,
           slots: Tensor) -> None:
    if (q_weight is None) != (k_weight is None):
        raise ValueError("rope_kv_write: give both norm weights (qk_norm_rope) or neither (rope)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"rope_kv_write: q, k [B, S, heads, D], v [B, Hk, S, D], pools [pages, block_size, Hk, D] "
                         f"expected, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, pools "
                         f"{tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    b, s, hk, d = k.shape
    if tuple(v.shape) != (b, hk, s, d) or tuple(k_pool.shape[2:]) != (hk, d) or tuple(slots.shape) != (b,):
        raise ValueError(f"rope_kv_write: v {tuple(v.shape)}, pools {tuple(k_pool.shape)} or slots "
                         f"{tuple(slots.shape)} do not fit k {tuple(k.shape)}")


def _fits_kernel(q, k, v, k_pool, v_pool) -> bool:
    return (_on_triton(q) and q.shape[1] == 1 and all(t.dtype == q.dtype for t in (k, v, k_pool, v_pool))
            and all(t.stride(-1) == 1 for t in (q, k, v, k_pool, v_pool)))


@torch.library.custom_op("cohere_fx::rope_kv_write", mutates_args=("k_pool", "v_pool"))
def rope_kv_write(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, q_weight: Optional[Tensor],
                  k_weight: Optional[Tensor], eps: float, k_pool: Tensor, v_pool: Tensor, slots: Tensor) -> Tensor:
    """q [B, S, H, D], k [B, S, Hk, D], v [B, Hk, S, D], cos/sin [1 or B, S, D], norm weights [H, D], [Hk, D] or
    None, pools [pages, block_size, Hk, D], slots [B] -> q rotated [B, H, S, D]; writes position S - 1 of the
    rotated k and of v into the pools at ``slots``."""
    _check(q, k, v, q_weight, k_weight, k_pool, v_pool, slots)
    if not _fits_kernel(q, k, v, k_pool, v_pool):
        return rope_kv_write_reference(q, k, v, cos, sin, q_weight, k_weight, eps, k_pool, v_pool, slots)
    from cohere_fx.kernels.rope_kv_write import rope_kv_write_fwd

    return rope_kv_write_fwd(q, k, v, cos, sin, q_weight, k_weight, eps, k_pool, v_pool, slots)


@rope_kv_write.register_fake
def _(q, k, v, cos, sin, q_weight, k_weight, eps, k_pool, v_pool, slots):
    b, s, h, d = q.shape
    return q.new_empty((b, h, s, d))
