"""``decode_swiglu``: in a decode step, the ``decode_linear`` call over q, k, v, gate and up and the ``swiglu`` of
its last two outputs -> one cohere_fx.decode_swiglu.

The search is what the ``decode_linear`` and ``swiglu`` patterns wrote for a Cohere layer's projections (this
pattern runs after both): the five linears that read the LayerNorm output, in the model's order, and the MLP's
activation of gate and up. The matcher takes only calls whose gate and up outputs nothing but the SwiGLU reads.

Checks: one dtype everywhere; gate and up weights of one shape. Exactness: the op rounds as the two unfused ops do,
to the bit.
"""
import operator

import torch

from cohere_fx.patterns.base import Match, Pattern, fake_value

ops = torch.ops.cohere_fx


def search(x, q_weight, k_weight, v_weight, gate_weight, up_weight):
    outs = ops.decode_linear.default(x, [q_weight, k_weight, v_weight, gate_weight, up_weight])
    return outs[0], outs[1], outs[2], ops.swiglu.default(outs[3], outs[4])


_WEIGHTS = ("q_weight", "k_weight", "v_weight", "gate_weight", "up_weight")


def check(match: Match):
    vals = [match.val(name) for name in ("x", *_WEIGHTS)]
    if any(v is None for v in vals):
        return "no traced shapes"
    if len({v.dtype for v in vals}) != 1:
        return "dtypes differ: " + ", ".join(f"{name} {v.dtype}" for name, v in zip(("x", *_WEIGHTS), vals))
    gate, up = vals[-2:]
    if tuple(gate.shape) != tuple(up.shape):
        return f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ"
    return None


def replace(match: Match):
    graph = match.graph
    fused = match.call(ops.decode_swiglu.default, match["x"], [match[name] for name in _WEIGHTS[:3]],
                       match["gate_weight"], match["up_weight"])
    fused.meta["example_value"] = [fake_value(out) for out in match.outputs]
    return tuple(graph.call_function(operator.getitem, (fused, i)) for i in range(4))


PATTERN = Pattern("decode_swiglu", search, replace, check)
