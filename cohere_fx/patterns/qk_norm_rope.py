"""``qk_norm_rope``: per-head QK LayerNorm + transpose + interleaved RoPE -> cohere_fx.qk_norm_rope.

CohereAttention with ``use_qk_norm`` (Command R+): ``q_norm``/``k_norm`` (CohereLayerNorm with a [heads,
head_dim] weight) on the [B, S, H, D] projections, then ``transpose(1, 2)``, then ``apply_rotary_pos_emb``. The
search function is that code, built from the same pieces as the ``layer_norm`` and ``rope`` patterns.
"""
import torch

from cohere_fx.patterns import layer_norm, rope
from cohere_fx.patterns.base import Match, Pattern


def search(q, k, q_weight, k_weight, cos, sin, eps, norm_dtype, out_dtype):
    q = layer_norm.search(q, q_weight, eps, norm_dtype)
    k = layer_norm.search(k, k_weight, eps, norm_dtype)
    return rope.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, out_dtype)


def check(match: Match):
    reason = rope.check_rope_inputs(match)
    if reason:
        return reason
    q, k = match.val("q"), match.val("k")
    q_weight, k_weight = match.val("q_weight"), match.val("k_weight")
    if tuple(q_weight.shape) != tuple(q.shape[-2:]) or tuple(k_weight.shape) != tuple(k.shape[-2:]):
        return f"norm weights {tuple(q_weight.shape)}, {tuple(k_weight.shape)} are not [heads, head_dim]"
    if match["norm_dtype"] != q.dtype:
        return f"norm output cast to {match['norm_dtype']}, q is {q.dtype}"
    if not isinstance(match["eps"], (int, float)):
        return f"eps is {match['eps']!r}, not a number"
    return None


def replace(match: Match):
    fused = match.call(torch.ops.cohere_fx.qk_norm_rope.default, match["q"], match["k"], match["cos"], match["sin"],
                       match["q_weight"], match["k_weight"], float(match["eps"]))
    return match.split(fused, ("q", "k"))


PATTERN = Pattern("qk_norm_rope", search, replace, check, literals=("eps", "norm_dtype", "out_dtype"))
