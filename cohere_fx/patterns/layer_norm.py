"""``layer_norm``: CohereLayerNorm (the input norm of every layer and the final norm) -> cohere_fx.layer_norm.

The search function is ``CohereLayerNorm.forward`` of transformers' modeling_cohere.py, line for line. The
per-head QK norms have the same math with a ``[heads, head_dim]`` weight; they are left to ``qk_norm_rope``,
which also fuses the RoPE that follows them.
"""
import torch

from cohere_fx.patterns.base import Match, Pattern


def search(x, weight, eps, out_dtype):
    h = x.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    variance = (h - mean).pow(2).mean(-1, keepdim=True)
    h = (h - mean) * torch.rsqrt(variance + eps)
    h = weight.to(torch.float32) * h
    return h.to(out_dtype)


def check(match: Match):
    x, weight = match.val("x"), match.val("weight")
    if x is None or weight is None:
        return "no traced shapes"
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        return f"weight shape {tuple(weight.shape)} is not [hidden] (per-head norms belong to qk_norm_rope)"
    if match["out_dtype"] != x.dtype:
        return f"output cast to {match['out_dtype']}, input is {x.dtype}"
    if not isinstance(match["eps"], (int, float)):
        return f"eps is {match['eps']!r}, not a number"
    return None


def replace(match: Match):
    return match.call(torch.ops.cohere_fx.layer_norm.default, match["x"], match["weight"], float(match["eps"]))


PATTERN = Pattern("layer_norm", search, replace, check, literals=("eps", "out_dtype"))
