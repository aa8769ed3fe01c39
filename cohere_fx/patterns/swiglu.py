"""``swiglu``: CohereMLP's ``act_fn(gate_proj(x)) * up_proj(x)`` with a SiLU ``act_fn`` -> cohere_fx.swiglu.

HF maps ``hidden_act`` "silu" (Cohere's default) to its SiLUActivation, whose forward calls ``F.silu(input)``,
and "swish" to ``nn.SiLU``, which calls ``F.silu(input, inplace=False)``. Dynamo records each call as written,
so there is one search function per spelling. Other activations (gelu, ...) are other calls and do not match.
The projections are not part of the match: gate and up may come from plain linears or from PEFT LoRA layers.
"""
import torch
import torch.nn.functional as F

from cohere_fx.kernels.elementwise import DTYPES
from cohere_fx.patterns.base import Match, Pattern, known_equal

# SiLUActivation calls F.silu(input) with no keyword; symbolic_trace would record F.silu's default
# inplace=False unless the call is a leaf.
silu = F.silu
torch.fx.wrap("silu")


def search_silu_activation(gate, up):
    return silu(gate) * up


def search_nn_silu(gate, up):
    return F.silu(gate, inplace=False) * up


def check(match: Match):
    gate, up = match.val("gate"), match.val("up")
    if gate is None or up is None:
        return "no traced shapes"
    if not known_equal(gate.shape, up.shape):
        return f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape (broadcast)"
    if gate.dtype != up.dtype or gate.dtype not in DTYPES:
        return f"gate {gate.dtype} / up {up.dtype}: not one dtype of {DTYPES}"
    if gate.device != up.device:
        return f"gate on {gate.device}, up on {up.device}"
    return None


def replace(match: Match):
    return match.call(torch.ops.cohere_fx.swiglu.default, match["gate"], match["up"])


PATTERN = Pattern("swiglu", (search_silu_activation, search_nn_silu), replace, check)
