"""Sliding-window causal attention through ``flex_attention`` with a block mask built from the window alone.

Not a custom op: ``flex_attention`` is a higher-order op that inductor compiles into a flash-style Triton
kernel (forward and backward) that skips the blocks outside the band, so no [S, S] mask is ever built. The
block mask is computed from block indices (O((S/128)^2) integers), not by evaluating a dense mask.
Without inductor, torch runs flex_attention's unfused reference (correct, not fast). PyTorch has no CPU
backward for flex_attention, so the ``sliding_attention`` pattern only rewrites CPU graphs that need no grad.
"""
import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128


def band_block_mask(q_len: int, kv_len: int, window: int, device) -> BlockMask:
    """Block mask of ``kv <= q and kv > q - window``: blocks fully inside the band are 'full' (no mask_mod
    call), blocks crossing an edge are 'partial'."""
    q_blocks = torch.arange((q_len + BLOCK - 1) // BLOCK, device=device)
    kv_blocks = torch.arange((kv_len + BLOCK - 1) // BLOCK, device=device)
    r0, r1 = (q_blocks * BLOCK)[:, None], (torch.clamp((q_blocks + 1) * BLOCK, max=q_len) - 1)[:, None]
    c0, c1 = (kv_blocks * BLOCK)[None, :], (torch.clamp((kv_blocks + 1) * BLOCK, max=kv_len) - 1)[None, :]
    any_visible = (c0 <= r1) & (c1 >= r0 - window + 1)
    all_visible = (c1 <= r0) & (c0 >= r1 - window + 1)
    partial = any_visible & ~all_visible

    def to_indices(blocks: Tensor):
        order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return blocks.sum(-1).to(torch.int32)[None, None], order[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(all_visible)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


def sliding_window_attention(query: Tensor, key: Tensor, value: Tensor, window: int, scale: float,
                             enable_gqa: bool) -> Tensor:
    block_mask = band_block_mask(query.shape[-2], key.shape[-2], window, query.device)
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
