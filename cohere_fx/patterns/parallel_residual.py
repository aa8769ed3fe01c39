"""``parallel_residual``: the Cohere decoder layer's ``residual + hidden_states_attention + hidden_states_mlp``
-> cohere_fx.parallel_residual.

The search is that line of CohereDecoderLayer.forward (and Cohere2DecoderLayer's, the same line). A sum of
three tensors could appear elsewhere, so the match must have been recorded directly in a Cohere decoder
layer's forward (Dynamo's ``nn_module_stack``): that forward holds no other three-term sum, while the
attention, the MLP and PEFT's LoRA layers are modules of their own. The producers are not required to be
linears: under LoRA, o_proj and down_proj end in ``base + lora_B(lora_A(x)) * scaling``, and the residual must
still match there. Any match is exact anyway: the op rounds ``residual + attn`` and then the sum, as eager does.
"""
import torch

from cohere_fx.kernels.elementwise import DTYPES
from cohere_fx.patterns.base import Match, Pattern, known_equal

DECODER_LAYERS = ("CohereDecoderLayer", "Cohere2DecoderLayer")


def search(residual, attn, mlp):
    return residual + attn + mlp


def innermost_module(node: torch.fx.Node):
    """Class name of the module whose forward Dynamo recorded ``node`` in, or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    _, cls = list(stack.values())[-1]
    return cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]


def check(match: Match):
    modules = {innermost_module(n) for n in match.nodes}
    if not modules <= set(DECODER_LAYERS):
        return f"recorded in {sorted(map(str, modules))}, not directly in a Cohere decoder layer"
    vals = [match.val(name) for name in ("residual", "attn", "mlp")]
    if any(v is None for v in vals):
        return "no traced shapes"
    first = vals[0]
    for v in vals[1:]:
        if not known_equal(v.shape, first.shape) or v.dtype != first.dtype or v.device != first.device:
            return "terms differ: " + ", ".join(f"{v.dtype}{tuple(v.shape)}" for v in vals)
    if first.dtype not in DTYPES:
        return f"dtype {first.dtype} is not one of {DTYPES}"
    return None


def replace(match: Match):
    return match.call(torch.ops.cohere_fx.parallel_residual.default, match["residual"], match["attn"],
                      match["mlp"])


PATTERN = Pattern("parallel_residual", search, replace, check)
