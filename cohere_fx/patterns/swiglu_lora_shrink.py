"""``swiglu_lora_shrink``: CohereMLP's SwiGLU output read by PEFT's LoRA A of down_proj (as the ``swiglu`` and
``lora_shrink`` patterns wrote them; this one runs after both) -> cohere_fx.swiglu_lora_shrink.

Why: the backward of the pair becomes one pass over the MLP's intermediate tensors instead of five
(kernels/swiglu_lora_shrink.py). The match returns act too: the base down projection keeps reading it.

Checks: the adapter's rank fits the fused kernel (at most 32 padded: one rank-r down adapter; a larger one keeps
the two ops), and gate or up needs a gradient (else the fused op's act would ask the base projection for one that
nothing reads). With ``lora_dropout > 0`` the adapter reads a dropout sample, ``lora_shrink`` does not match and
neither does this. Exactness: the ops' own roundings (ops/swiglu_lora_shrink.py).
"""
import torch

from cohere_fx.kernels.lora import _tiles
from cohere_fx.kernels.swiglu_lora_shrink import MAX_RANK
from cohere_fx.patterns.base import Match, Pattern

ops = torch.ops.cohere_fx


def search(gate, up, weight):
    act = ops.swiglu.default(gate, up)
    return act, ops.lora_shrink.default(act, weight)


def check(match: Match):
    gate, up, weight = match.val("gate"), match.val("up"), match.val("weight")
    if gate is None or up is None or weight is None:
        return "no traced shapes"
    if _tiles(weight.shape[0])[0] > MAX_RANK:
        return f"rank {weight.shape[0]} is above the fused backward's {MAX_RANK}"
    if not (gate.requires_grad or up.requires_grad):
        # act would require grad as the op's output (A does), and the base projection would compute a gradient
        # for it that nothing needs (a [tokens, 14336] GEMM)
        return "gate and up need no gradient (only A does)"
    return None


def replace(match: Match):
    fused = match.call(ops.swiglu_lora_shrink.default, match["gate"], match["up"], match["weight"])
    return match.split(fused, ("act", "h"))


PATTERN = Pattern("swiglu_lora_shrink", search, replace, check)
