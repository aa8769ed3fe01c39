"""``cohere_fx::paged_attention``: decode attention reading K/V pages in place (one query token per sequence).

Why an op: in HF's decode step the cache gathers every past K/V into a dense tensor, ``repeat_kv`` copies it
``H / Hkv`` times and SDPA reads it again; the op reads each page once, straight from the pools of
``cohere_fx.runtime.PagedKVCache``. Decode only: no autograd.

Arguments: q ``[B, H, D]``; k_pool, v_pool ``[num_blocks, block_size, Hkv, D]`` (q's dtype); block_tables
``[B, max_blocks]`` int32 (column ``pos // block_size``); seq_lens ``[B]`` int32, tokens in the cache including the
current one; ``window`` 0 for full attention, else only positions ``kv > q - window`` (Cohere2's sliding layers).
"""
import torch
from torch import Tensor

from cohere_fx.kernels import runs_on_triton


def _check_args(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, seq_lens: Tensor) -> None:
    torch._check(q.dim() == 3 and k_pool.dim() == 4, lambda: "q must be [B, H, D] and pools [N, block, Hkv, D]")
    torch._check(k_pool.shape == v_pool.shape, lambda: f"k_pool {k_pool.shape} != v_pool {v_pool.shape}")
    torch._check(q.shape[1] % k_pool.shape[2] == 0, lambda: "query heads must be a multiple of kv heads")
    torch._check(q.shape[2] == k_pool.shape[3], lambda: "q and pools disagree on head_dim")
    torch._check(q.dtype == k_pool.dtype == v_pool.dtype, lambda: "q and the pools must share one dtype")
    torch._check(block_tables.dtype == seq_lens.dtype == torch.int32, lambda: "block_tables, seq_lens: int32")
    torch._check(block_tables.shape[0] == seq_lens.shape[0] == q.shape[0], lambda: "one table row per sequence")


def paged_attention_reference(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float, window: int
) -> Tensor:
    """Gather every table entry's page, mask positions outside ``[len - window, len)``, dense fp32 softmax."""
    batch, num_heads, head_dim = q.shape
    kv_heads = k_pool.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    k = k_pool[block_tables.long()].reshape(batch, -1, kv_heads, head_dim).to(compute)
    v = v_pool[block_tables.long()].reshape(batch, -1, kv_heads, head_dim).to(compute)
    pos = torch.arange(k.shape[1], device=q.device)
    lens = seq_lens.long()[:, None]
    valid = pos < lens
    if window > 0:
        valid &= pos >= lens - window
    valid = valid[:, None, None, :]
    qg = q.to(compute).view(batch, kv_heads, num_heads // kv_heads, head_dim)
    scores = torch.einsum("bkgd,bnkd->bkgn", qg, k) * scale
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).masked_fill(~valid, 0.0)
    return torch.einsum("bkgn,bnkd->bkgd", probs, v).reshape(batch, num_heads, head_dim).to(q.dtype)


@torch.library.custom_op("cohere_fx::paged_attention", mutates_args=())
def paged_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float, window: int
) -> Tensor:
    _check_args(q, k_pool, v_pool, block_tables, seq_lens)
    # Triton 3.6's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits: bf16 on the CPU takes the
    # reference (the kernel's half-precision path is checked there in fp16, bf16 on a GPU).
    if runs_on_triton(q) and not (q.device.type == "cpu" and q.dtype == torch.bfloat16):
        from cohere_fx.kernels.paged_attention import paged_attention_fwd

        return paged_attention_fwd(q, k_pool, v_pool, block_tables, seq_lens, scale, window)
    return paged_attention_reference(q, k_pool, v_pool, block_tables, seq_lens, scale, window)


@paged_attention.register_fake
def _(q, k_pool, v_pool, block_tables, seq_lens, scale, window):
    _check_args(q, k_pool, v_pool, block_tables, seq_lens)
    return torch.empty_like(q, memory_format=torch.contiguous_format)
