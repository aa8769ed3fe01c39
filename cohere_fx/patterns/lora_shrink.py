"""``lora_shrink``: PEFT's ``lora_A(x.to(fp32))`` over a bf16/fp16 activation -> cohere_fx.lora_shrink(x, A).

Why: the cast makes an fp32 copy of the activation that autograd keeps for A's gradient (with the down
projection's input that is [tokens, 14336] fp32 per layer), and the fp32 GEMM runs on CUDA cores. The op reads
the activation in its own dtype and saves it so; the fp32 copy was exact, so nothing changes but the accumulation
order (kernels/lora.py).

The search is the cast followed by a bias-free linear, as PEFT's Linear writes it (``_cast_input_dtype``, then
``nn.Linear.forward`` of ``lora_A``); it also matches the one GEMM ``lora_shared_input`` makes of several A
matrices (its weight is their concatenation). The cast must have no other reader (dropout > 0 puts a dropout
between them: no match), the input must be bf16/fp16, the weight fp32 with a rank of at most 128.
"""
import torch
import torch.nn.functional as F

from cohere_fx.kernels.lora import MAX_RANK
from cohere_fx.ops.lora import LOW_PRECISION
from cohere_fx.patterns.base import Match, Pattern, known_equal


def search(x, weight, dtype):
    return F.linear(x.to(dtype), weight, None)


def check(match: Match):
    x, weight = match.val("x"), match.val("weight")
    if x is None or weight is None:
        return "no traced shapes"
    if x.dtype not in LOW_PRECISION or match["dtype"] != torch.float32 or weight.dtype != torch.float32:
        return f"input {x.dtype} cast to {match['dtype']} for a {weight.dtype} weight: not a bf16/fp16 model " \
               f"with fp32 adapters"
    if weight.dim() != 2 or not known_equal(weight.shape[1], x.shape[-1]) or not isinstance(weight.shape[0], int):
        return f"weight {tuple(weight.shape)} is not [rank, {x.shape[-1]}]"
    if weight.shape[0] > MAX_RANK:
        return f"rank {weight.shape[0]} is above {MAX_RANK}"
    if x.device != weight.device:
        return f"input on {x.device}, weight on {weight.device}"
    return None


def replace(match: Match):
    return match.call(torch.ops.cohere_fx.lora_shrink.default, match["x"], match["weight"])


PATTERN = Pattern("lora_shrink", search, replace, check, literals=("dtype",))
