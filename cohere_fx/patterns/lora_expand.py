"""``lora_expand``: the end of a PEFT LoRA layer over a bf16/fp16 base, ``(base + lora_B(h) * scaling)
.to(dtype)`` -> cohere_fx.lora_expand(base, h, B, scaling, round_update=False); bitsandbytes' 4-bit layers
write ``base + (lora_B(h) * scaling).to(dtype)`` -> the same op with ``round_update=True``.

Why: with fp32 adapters, lora_B writes an fp32 [tokens, out] tensor that is scaled, added to the base output in
fp32 and rounded (three passes over fp32 data), and its backward makes an fp32 copy of the output gradient for two
fp32 GEMMs. The op computes the rank-r update inside the pass that reads the base output and writes the result,
and its backward reads the output gradient once per GEMM in its own dtype (kernels/lora.py).

Checks: the base and the cast are one low-precision dtype, h and B are fp32, B is [out, rank <= 128]. PEFT's
``scaling`` (lora_alpha / r) is read from the graph. A layer with several active adapters adds several updates
before its one cast and does not match (each update would need its own rounding point).
"""
import operator

import torch
import torch.nn.functional as F

from cohere_fx.kernels.lora import MAX_RANK
from cohere_fx.ops.lora import LOW_PRECISION
from cohere_fx.patterns.base import Match, Pattern, known_equal


def search_linear(base, h, weight, scaling, dtype):
    return (base + F.linear(h, weight, None) * scaling).to(dtype)


def search_linear4bit(base, h, weight, scaling, dtype):
    return base + (F.linear(h, weight, None) * scaling).to(dtype)


def check(match: Match):
    base, h, weight = match.val("base"), match.val("h"), match.val("weight")
    if base is None or h is None or weight is None:
        return "no traced shapes"
    if base.dtype not in LOW_PRECISION or match["dtype"] != base.dtype:
        return f"base output {base.dtype} cast to {match['dtype']}: not a bf16/fp16 base layer"
    if h.dtype != torch.float32 or weight.dtype != torch.float32:
        return f"h {h.dtype} and B {weight.dtype}: not fp32 adapters"
    if weight.dim() != 2 or not isinstance(weight.shape[1], int) or not known_equal(weight.shape[0], base.shape[-1]):
        return f"B {tuple(weight.shape)} is not [{base.shape[-1]}, rank]"
    if weight.shape[1] > MAX_RANK:
        return f"rank {weight.shape[1]} is above {MAX_RANK}"
    if not known_equal(h.shape[:-1], base.shape[:-1]):
        return f"h {tuple(h.shape)} and base {tuple(base.shape)} differ in their leading dims"
    if not isinstance(match["scaling"], (int, float)):
        return f"scaling {match['scaling']!r} is not a number"
    return None


def replace(match: Match):
    round_update = match.outputs[0].target is operator.add  # Linear4bit's spelling ends in the add, Linear's in .to
    return match.call(torch.ops.cohere_fx.lora_expand.default, match["base"], match["h"], match["weight"],
                      float(match["scaling"]), round_update)


PATTERN = Pattern("lora_expand", (search_linear, search_linear4bit), replace, check, literals=("scaling", "dtype"))
