"""``sliding_attention``: SDPA with a materialised sliding-window mask -> a windowed flex_attention kernel.

Cohere2's sliding layers (every layer but each fourth) mask ``kv_idx > q_idx - window`` on top of causality.
When the sequence is no longer than the window that mask is plain causal and ``causal_attention`` takes it;
here the window is narrower than the sequence, and the dense [S, S] mask is replaced by a block mask computed
from the window (see ops/sliding_attention.py). The window is read from the evaluated mask, never assumed.
"""

from cohere_fx.ops.sliding_attention import sliding_window_attention
from cohere_fx.patterns import causal_attention
from cohere_fx.patterns.attention_mask import unrepeated_kv
from cohere_fx.patterns.base import Match, Pattern


def check(match: Match):
    kind = causal_attention.mask_kind(match)
    if not isinstance(kind, tuple):
        return "not a sliding-window mask" if kind in ("causal", "none") else kind
    q = match.val("query")
    if q.device.type == "cpu" and q.requires_grad:
        return "flex_attention has no CPU backward (left as SDPA with a mask)"
    if match["dropout_p"] != 0.0:
        return f"dropout_p={match['dropout_p']} (flex_attention has no dropout)"
    return None


def replace(match: Match):
    key, n_rep = unrepeated_kv(match["key"])
    value, v_rep = unrepeated_kv(match["value"])
    if n_rep != v_rep:
        key, value, n_rep = match["key"], match["value"], 1
    window = causal_attention.mask_kind(match)[1]
    return match.call(sliding_window_attention, match["query"], key, value, window, match["scale"], n_rep > 1)


PATTERN = Pattern("sliding_attention", causal_attention.search, replace, check, literals=("dropout_p", "scale"))
