"""``causal_attention``: SDPA with a materialised causal mask -> SDPA with ``is_causal=True`` (the flash path).

HF builds a boolean mask from position comparisons and passes it to SDPA with ``is_causal=False``; any explicit
mask keeps SDPA off its flash kernel. When the mask provably equals the causal mask (square, no padding) it is
dropped for ``is_causal=True``; when it is all true (one query token at the end of the cache) it is dropped.
``repeat_kv`` before SDPA is replaced by SDPA's own ``enable_gqa``, so K/V are never copied per query head.
Sliding-window masks narrower than the sequence are left to ``sliding_attention``; padded masks stay exact.
"""
import torch.nn.functional as F

from cohere_fx.patterns.attention_mask import constant_value, mask_is_all_true, mask_window, unrepeated_kv
from cohere_fx.patterns.base import Match, Pattern


def search(query, key, value, attn_mask, dropout_p, scale):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          scale=scale, is_causal=False)


def attention_shapes(match: Match):
    q, k = match.val("query"), match.val("key")
    return q.shape[-2], k.shape[-2]


def mask_kind(match: Match):
    """'causal', 'none' (all true), ('window', w) or a reason string; cached on the mask node, which every
    layer's attention shares."""
    q_len, kv_len = attention_shapes(match)
    if not (isinstance(q_len, int) and isinstance(kv_len, int)):
        return "dynamic sequence length: the mask cannot be evaluated"
    key = ("cohere_fx_mask_kind", q_len, kv_len)
    meta = match["attn_mask"].meta
    if key not in meta:
        meta[key] = _mask_kind(match)
    return meta[key]


def _mask_kind(match: Match):
    mask = constant_value(match["attn_mask"])
    if mask is None:
        return "the mask reads an input (padding) or is not a constant position comparison"
    q_len, kv_len = attention_shapes(match)
    if mask_is_all_true(mask):
        return "none"
    window = mask_window(mask, q_len, kv_len)
    if window is None:
        return "the mask is not causal"
    return "causal" if window >= kv_len else ("window", window)


def check(match: Match):
    kind = mask_kind(match)
    if isinstance(kind, tuple):
        return f"sliding window {kind[1]} < sequence {attention_shapes(match)[1]} (sliding_attention)"
    return None if kind in ("causal", "none") else kind


def replace(match: Match):
    key, n_rep = unrepeated_kv(match["key"])
    value, v_rep = unrepeated_kv(match["value"])
    if n_rep != v_rep:
        key, value, n_rep = match["key"], match["value"], 1
    causal = mask_kind(match) == "causal"
    graph = match.graph
    return graph.create_node(
        "call_function", F.scaled_dot_product_attention, (match["query"], key, value),
        dict(attn_mask=None, dropout_p=match["dropout_p"], scale=match["scale"], is_causal=causal,
             enable_gqa=n_rep > 1),
        name="causal_attention")


PATTERN = Pattern("causal_attention", search, replace, check, literals=("dropout_p", "scale"))
