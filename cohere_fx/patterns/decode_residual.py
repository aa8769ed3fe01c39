"""``decode_residual``: in a decode step, the layer's o_proj and down_proj ``decode_linear`` calls and the
``parallel_residual`` that adds them -> one cohere_fx.decode_residual.

The search is what the ``decode_linear`` and ``parallel_residual`` patterns wrote for ``residual +
o_proj(attn) + down_proj(mlp)`` (this pattern runs after both), so it matches Cohere decoder layers in decode
steps and nothing else: each ``decode_linear`` holds one weight (o and down read different inputs, so they are
never grouped), and the matcher takes only calls whose outputs nothing else reads.

Checks: one dtype everywhere; o's and down's outputs have the residual's shape. Exactness: the op rounds as the
three unfused ops do, to the bit.
"""
import torch

from cohere_fx.patterns.base import Match, Pattern, fake_value, known_equal

ops = torch.ops.cohere_fx


def search(residual, attn, o_weight, mlp, down_weight):
    o = ops.decode_linear.default(attn, [o_weight])
    down = ops.decode_linear.default(mlp, [down_weight])
    return ops.parallel_residual.default(residual, o[0], down[0])


def check(match: Match):
    names = ("residual", "attn", "o_weight", "mlp", "down_weight")
    vals = [match.val(name) for name in names]
    if any(v is None for v in vals):
        return "no traced shapes"
    residual, attn, o_weight, mlp, down_weight = vals
    if len({v.dtype for v in vals}) != 1:
        return "dtypes differ: " + ", ".join(f"{name} {v.dtype}" for name, v in zip(names, vals))
    if not (known_equal(o_weight.shape[0], residual.shape[-1]) and known_equal(down_weight.shape[0],
                                                                               residual.shape[-1])):
        return f"o {tuple(o_weight.shape)} and down {tuple(down_weight.shape)} do not give the residual's width " \
               f"{residual.shape[-1]}"
    if not (known_equal(attn.shape[:-1], residual.shape[:-1]) and known_equal(mlp.shape[:-1], residual.shape[:-1])):
        return f"rows differ: residual {tuple(residual.shape)}, attn {tuple(attn.shape)}, mlp {tuple(mlp.shape)}"
    if any(fake_value(match[name]).requires_grad for name in ("residual", "attn", "mlp")):
        return "an input requires grad (the op has no backward)"
    return None


def replace(match: Match):
    return match.call(ops.decode_residual.default, match["residual"], match["attn"], match["o_weight"],
                      match["mlp"], match["down_weight"])


PATTERN = Pattern("decode_residual", search, replace, check)
