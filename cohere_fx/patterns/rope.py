"""``rope``: transpose to [B, H, S, D] + HF's interleaved ``apply_rotary_pos_emb`` -> cohere_fx.rope.

Command R (no QK-norm) and Cohere2's sliding layers; Cohere2's global layers apply no RoPE, so nothing there
matches. The search functions are modeling_cohere.py's ``rotate_half`` / ``apply_rotary_pos_emb`` line for line;
a half-split (Llama/NeoX) rotation has different slices and concatenation and does not match.
"""
import torch

from cohere_fx.patterns.base import Match, Pattern, known_equal


def rotate_half(x):
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


def apply_rotary_pos_emb(q, k, cos, sin, out_dtype):
    q = q.to(torch.float32)
    k = k.to(torch.float32)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed.to(out_dtype), k_embed.to(out_dtype)


def search(q, k, cos, sin, out_dtype):
    return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, out_dtype)


def check_rope_inputs(match: Match):
    """The conditions under which the fused kernel's layout and dtype equal HF's result."""
    q, k, cos = match.val("q"), match.val("k"), match.val("cos")
    if q is None or k is None or cos is None:
        return "no traced shapes"
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[-1] % 2:
        return f"q {tuple(q.shape)} / k {tuple(k.shape)} are not [B, S, heads, even head_dim]"
    if cos.dim() != 3 or cos.shape[-1] != q.shape[-1] or not known_equal(cos.shape[1], q.shape[1]):
        return f"cos {tuple(cos.shape)} is not [B, S, head_dim]"
    if match["out_dtype"] != q.dtype or k.dtype != q.dtype:
        return f"output cast to {match['out_dtype']}, q is {q.dtype}, k is {k.dtype}"
    return None


def replace(match: Match):
    fused = match.call(torch.ops.cohere_fx.rope.default, match["q"], match["k"], match["cos"], match["sin"])
    return match.split(fused, ("q", "k"))


PATTERN = Pattern("rope", search, replace, check_rope_inputs, literals=("out_dtype",))
