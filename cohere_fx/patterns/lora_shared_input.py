"""``lora_shared_input``: the PEFT LoRA A matrices that read one activation -> one GEMM over their concatenation.

Why: with ``lora_dropout == 0`` PEFT's dropout is an ``Identity``, so the LoRA A linears of q, k, v and of gate,
up all read the same LayerNorm output (Cohere's parallel block feeds attention and MLP from one norm). Each A is
``[r, hidden]``: its GEMM is bound by reading the activation ``[tokens, hidden]``, which five separate GEMMs read
five times forward and ten times backward (dX and dA of each). One GEMM over ``cat(A_q, A_k, A_v, A_gate, A_up)``
reads it once forward and twice backward; ``split`` hands each LoRA B its own columns.

Exactness: each output column of the fused GEMM is the dot product of the same input row with the same weight row
as in its own GEMM; only the kernel's blocking may change the order of the fp32 accumulation (fp32: rounding-level
differences; bf16: the same, before the one rounding of the output). The backward of ``split`` is a ``cat`` of the
gradients and that of ``cat`` a ``split``, so autograd is exact too; dX becomes one GEMM that sums the five
contributions in its fp32 accumulator, where eager adds five GEMM outputs in the activation dtype (in bf16 the
fused sum is, if anything, the more accurate one).

Design:
- Pure torch ops (``cat``, ``linear``, ``split``), no custom op: the saving is fewer reads of the activation, which
  any GEMM gives once the weights are side by side; inductor or aot_autograd differentiate them as usual.
- The weights are concatenated every step, in the graph: they are parameters the optimizer updates, and the copy
  is tiny (``sum(r) x hidden``; 640 KiB per layer at r=16, hidden 4096, bf16) next to the activation it saves
  reading. The same trick on the base q/k/v/gate/up weights would copy whole matrices each step, so only LoRA A
  linears are grouped: the ones Dynamo recorded inside PEFT's ``lora_A`` ModuleDict (the node's module stack).
- A horizontal fusion (``SiblingPattern``): ``search`` (``nn.Linear.forward`` without bias, as PEFT calls each
  ``lora_A``) matches each member, and the matches are grouped by the node they read.
- When the LoRA weights are fp32 over bf16 activations (QLoRA without autocast) PEFT casts the input once per
  layer: members reading casts of one node to one dtype form a group, and the fused GEMM reads the first cast.
- With ``lora_dropout > 0`` each adapter reads its own dropout sample: the inputs differ, nothing is fused.
- The fused nodes go right after the group's first member (or its last input, if later), so the first LoRA B
  does not have to move.
"""
import operator
from typing import Optional

import torch
import torch.fx

from cohere_fx.patterns.base import Match, SiblingPattern, fake_value, known_equal


def search(x, weight):
    return torch.nn.functional.linear(x, weight, None)


def _in_lora_a(node: torch.fx.Node) -> bool:
    """Whether Dynamo recorded this call inside PEFT's ``lora_A[adapter]`` (module path ``....lora_A.<adapter>``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return False
    path, _ = list(stack.values())[-1]
    return path.split(".")[-2:-1] == ["lora_A"]


def _source(x: torch.fx.Node) -> tuple:
    """What a LoRA A reads, seen through PEFT's cast of the input to the adapter's dtype: (node, dtype or None)."""
    if x.op == "call_method" and x.target == "to" and len(x.args) == 2 and not x.kwargs \
            and isinstance(x.args[1], torch.dtype) and isinstance(x.args[0], torch.fx.Node):
        return x.args[0], x.args[1]
    return x, None


def check(match: Match) -> Optional[str]:
    x, weights = match.val("x"), [fake_value(w) for w in match["weights"]]
    if x is None or any(w is None for w in weights):
        return "no traced shapes"
    for w in weights:
        if w.dim() != 2 or not known_equal(w.shape[1], x.shape[-1]):
            return f"weight {tuple(w.shape)} is not [r, {x.shape[-1]}]"
        if w.dtype != x.dtype or w.device != x.device:
            return f"weight is {w.dtype} on {w.device}, input is {x.dtype} on {x.device}"
        if not isinstance(w.shape[0], int):
            return f"rank {w.shape[0]} is symbolic"
    return None


def replace(match: Match):
    graph = match.graph
    x, weights = match["x"], list(match["weights"])
    order = {n: i for i, n in enumerate(graph.nodes)}
    after = max([match.outputs[0], *weights], key=order.__getitem__)
    ranks = [fake_value(w).shape[0] for w in weights]
    with graph.inserting_before(after.next):  # in order, right after `after`
        weight = graph.create_node("call_function", torch.cat, (weights, 0), name=f"{match.pattern.name}_weight")
        fused = match.call(torch.nn.functional.linear, x, weight, None)
        # traced values for the patterns that run later (lora_shrink reads the fused GEMM): fake tensors compute
        # in their own fake mode
        weight.meta["example_value"] = torch.cat([fake_value(w) for w in weights], 0)
        fused.meta["example_value"] = torch.nn.functional.linear(fake_value(x), weight.meta["example_value"])
        parts = graph.create_node("call_function", torch.split, (fused, ranks, -1), name=f"{match.pattern.name}_split")
        parts.meta["example_value"] = tuple(fake_value(out) for out in match.outputs)
        return tuple(graph.call_function(operator.getitem, (parts, i)) for i in range(len(ranks)))


PATTERN = SiblingPattern("lora_shared_input", search, replace, check,
                         member=lambda match: _in_lora_a(match.outputs[0]), source=_source)
