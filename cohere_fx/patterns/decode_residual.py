"""``decode_residual``: in a decode step, a Cohere layer's tail ``parallel_residual(residual, o_proj(attn),
down_proj(swiglu(gate, up)))`` -> one cohere_fx.decode_residual.

Why: o_proj and down_proj are matrix-vector products that stream their weights; with the SwiGLU and the
residual sum around them they are four ops and up to six launches per layer, whose gaps a CUDA-graphed decode
step still pays. The op streams both weights in one launch (kernels/decode_residual.py).

The search reads the ops the ``swiglu`` and ``parallel_residual`` patterns wrote (this pattern runs after them),
so it only sees what those patterns have already proven to be CohereMLP's activation and the decoder layer's
residual sum; the two projections are plain bias-free linears (a PEFT LoRA layer adds its update after the base
linear and does not match). It applies where decode_linear does: the graph computes no gradient and the input
has at most 16 rows.
"""
import torch
import torch.nn.functional as F

from cohere_fx.kernels.elementwise import DTYPES
from cohere_fx.patterns.base import Match, Pattern, known_equal
from cohere_fx.patterns.decode_linear import in_decode_step


def search(residual, attn, o_weight, gate, up, down_weight):
    attn_out = F.linear(attn, o_weight, None)
    mlp_out = F.linear(torch.ops.cohere_fx.swiglu.default(gate, up), down_weight, None)
    return torch.ops.cohere_fx.parallel_residual.default(residual, attn_out, mlp_out)


def check(match: Match):
    names = ("residual", "attn", "o_weight", "gate", "up", "down_weight")
    vals = {name: match.val(name) for name in names}
    if any(v is None for v in vals.values()):
        return "no traced shapes"
    residual = vals["residual"]
    if residual.dtype not in DTYPES:
        return f"dtype {residual.dtype} is not one of {DTYPES}"
    for name in ("o_weight", "down_weight"):
        w = vals[name]
        if w.dim() != 2 or not isinstance(w.shape[0], int) or not w.is_contiguous():
            return f"{name} {tuple(w.shape)} is not a row-major matrix"
    if not known_equal(vals["o_weight"].shape[0], residual.shape[-1]):
        return f"o_weight {tuple(vals['o_weight'].shape)} does not produce the residual's {residual.shape[-1]}"
    if any(v.dtype != residual.dtype or v.device != residual.device for v in vals.values()):
        return "inputs differ in dtype or device: " + ", ".join(f"{n} {v.dtype} {v.device}" for n, v in vals.items())
    return None


def replace(match: Match):
    return match.call(torch.ops.cohere_fx.decode_residual.default, match["residual"], match["attn"],
                      match["o_weight"], match["gate"], match["up"], match["down_weight"])


def _decode_member(match: Match) -> bool:
    return in_decode_step(match, "residual")


PATTERN = Pattern("decode_residual", search, replace, check, member=_decode_member)
