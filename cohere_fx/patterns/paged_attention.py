"""``paged_attention``: SDPA over K/V gathered from a paged cache -> ``cohere_fx::paged_attention`` on the pools.

In a decode step traced through ``PagedDecodeView`` every layer gathers all of its block table's pages into a
dense ``[B, Hkv, W * block_size, D]`` K and V (``gather_pages``), HF repeats them per query head (``repeat_kv``,
because a mask is given) and SDPA masks out what lies beyond each sequence's length (and window). The op reads
only the attended pages, in place, once per kv head. The search functions call the cache's own ``gather_pages``,
so the match is that code and nothing else; ``check`` proves the mask is the view's ``length_mask`` or
``window_mask`` over the gathered positions and reads the window from it.
"""
import operator

import torch
import torch.fx
import torch.nn.functional as F

from cohere_fx.patterns.base import Match, Pattern, fake_value, known_equal
from cohere_fx.runtime.paged_cache import gather_pages, length_mask, window_mask


def search_repeat_kv(query, k_pool, v_pool, block_tables, attn_mask, batch, kv_heads, n_rep, kv_len, head_dim,
                     heads, dropout_p, scale):
    key = gather_pages(k_pool, block_tables)
    value = gather_pages(v_pool, block_tables)
    # HF's repeat_kv, as traced with its sizes as constants
    key = key[:, :, None, :, :].expand(batch, kv_heads, n_rep, kv_len, head_dim).reshape(batch, heads, kv_len,
                                                                                          head_dim)
    value = value[:, :, None, :, :].expand(batch, kv_heads, n_rep, kv_len, head_dim).reshape(batch, heads, kv_len,
                                                                                              head_dim)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                                          is_causal=False)


def search_no_repeat(query, k_pool, v_pool, block_tables, attn_mask, dropout_p, scale):
    key = gather_pages(k_pool, block_tables)
    value = gather_pages(v_pool, block_tables)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                                          is_causal=False)


# Not a rewrite: finds the view's masks, so check() can tell which one an attention reads (and its window).
_MASKS = Pattern("paged_attention_mask", (length_mask, window_mask), replace=None, check=None, literals=("window",))


def decode_mask(match: Match):
    """``(seq_lens node, window)`` if the attention mask is the view's length (window 0) or window mask over
    positions ``arange(kv_len)``, else a reason. Cached on the mask node, which every layer of a kind shares."""
    mask = match["attn_mask"]
    if "cohere_fx_paged_mask" not in mask.meta:
        found = [m for variant in _MASKS.variants for m in _MASKS.find(match.graph, variant) if m.outputs == [mask]]
        mask.meta["cohere_fx_paged_mask"] = (
            (found[0]["seq_lens"], found[0].bindings.get("window", 0), found[0]["positions"]) if found else
            "the mask is not the paged cache's length/window mask")
    return mask.meta["cohere_fx_paged_mask"]


def _is_arange(node, length) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.arange
            and node.args == (length,) and set(node.kwargs) <= {"device"})


def check(match: Match):
    q, k_pool, v_pool, tables = (match.val(n) for n in ("query", "k_pool", "v_pool", "block_tables"))
    if any(v is None for v in (q, k_pool, v_pool, tables)):
        return "no traced shapes"
    if q.dim() != 4 or q.shape[2] != 1:
        return f"query {tuple(q.shape)} is not one token per sequence"
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape or not (q.dtype == k_pool.dtype == v_pool.dtype):
        return "pools are not [N, block, Hkv, D] pairs in the query's dtype"
    batch, heads, _, head_dim = q.shape
    _, block_size, kv_heads, pool_dim = k_pool.shape
    if tables.dim() != 2 or tables.dtype != torch.int32 or not known_equal(tables.shape[0], batch):
        return "block tables are not int32 [B, W]"
    kv_len = tables.shape[1] * block_size
    if not known_equal(pool_dim, head_dim) or heads % kv_heads:
        return f"query heads {heads} x {head_dim} do not group over kv heads {kv_heads} x {pool_dim}"
    if "n_rep" in match.bindings and not known_equal(
            tuple(match[n] for n in ("batch", "kv_heads", "n_rep", "kv_len", "head_dim", "heads")),
            (batch, kv_heads, heads // kv_heads, kv_len, head_dim, heads)):
        return "repeat_kv sizes do not match the gathered K/V"
    if match["dropout_p"] != 0.0:
        return f"dropout_p={match['dropout_p']}"
    if not isinstance(match["scale"], float):
        return "no explicit float scale"
    mask = decode_mask(match)
    if isinstance(mask, str):
        return mask
    seq_lens, _, positions = mask
    lens = fake_value(seq_lens)
    if lens is None or lens.dtype != torch.int32 or lens.dim() != 1 or not known_equal(lens.shape[0], batch):
        return "sequence lengths are not int32 [B]"
    if not _is_arange(positions, kv_len):
        return f"mask positions are not arange({kv_len}) over the gathered pages"
    return None


def replace(match: Match):
    seq_lens, window, _ = decode_mask(match)
    graph = match.graph
    query = graph.create_node("call_function", operator.getitem, (match["query"], (slice(None), slice(None), 0)))
    out = match.call(torch.ops.cohere_fx.paged_attention.default, query, match["k_pool"], match["v_pool"],
                     match["block_tables"], seq_lens, match["scale"], window)
    query.meta["example_value"] = match.val("query")[:, :, 0]  # [B, H, D]: the op's input and output shape
    out.meta["example_value"] = query.meta["example_value"]
    return graph.create_node("call_method", "unsqueeze", (out, 2))


PATTERN = Pattern("paged_attention", (search_repeat_kv, search_no_repeat), replace, check,
                  literals=("batch", "kv_heads", "n_rep", "kv_len", "head_dim", "heads", "dropout_p", "scale"))
