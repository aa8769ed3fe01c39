"""``scaled_cross_entropy``: Cohere's head and HF's ForCausalLMLoss -> cohere_fx.head_cross_entropy.

HF computes ``logits = lm_head(h) * logit_scale``, upcasts to fp32 and runs ``F.cross_entropy``, which keeps an
fp32 log-softmax for the backward and writes an fp32 gradient; eager and inductor also keep the GEMM output
beside its scaled copy, and the gradient beside its scaled copy. At B2 x S2048 x 256 000 each bf16 copy is
2 GB and each fp32 one 4 GB. The op makes the scaled logits in one buffer (they are a model output,
``CausalLMOutput.logits``, so they stay), computes the loss from them with fp32 accumulation and, in the
backward, turns the loss gradient into head gradients chunk by chunk, never holding an [N, V] gradient.
'mean' divides the sum by the count of non-ignored labels, as F.cross_entropy does; 'sum' is what HF uses with
``num_items_in_batch`` (the division follows unchanged). ``linear_cross_entropy`` shares this search and goes
further when the logits are not wanted.
"""
import operator

import torch
import torch.nn.functional as F

from cohere_fx.patterns.base import Match, Pattern

# Dynamo records F.cross_entropy as one call; symbolic_trace would trace into it unless told it is a leaf.
cross_entropy = F.cross_entropy
torch.fx.wrap("cross_entropy")


def search(hidden, weight, logit_scale, labels, vocab_size, ignore_index, reduction):
    logits = F.linear(hidden, weight, None)
    logits = logits * logit_scale
    rows = logits.to(torch.float32).view(-1, vocab_size)
    return cross_entropy(rows, labels, ignore_index=ignore_index, reduction=reduction), logits


LITERALS = ("logit_scale", "vocab_size", "ignore_index", "reduction")


def check(match: Match):
    hidden, weight, labels = match.val("hidden"), match.val("weight"), match.val("labels")
    if hidden is None or weight is None or labels is None:
        return "no traced shapes"
    if match["reduction"] not in ("mean", "sum"):
        return f"reduction={match['reduction']!r}"
    if weight.dim() != 2 or weight.shape[0] != match["vocab_size"] or hidden.shape[-1] != weight.shape[1]:
        return f"head weight {tuple(weight.shape)} is not [vocab, hidden] for hidden {tuple(hidden.shape)}"
    if labels.dtype != torch.int64 or labels.dim() != 1:
        return f"labels {labels.dtype}{tuple(labels.shape)} are not int64 [N]"
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"hidden {hidden.dtype} / head weight {weight.dtype}"
    if not isinstance(match["logit_scale"], (int, float)) or not isinstance(match["ignore_index"], int):
        return f"logit_scale {match['logit_scale']!r} / ignore_index {match['ignore_index']!r} are not constants"
    return None


def rows(match: Match) -> torch.fx.Node:
    """The head's input as [N, hidden]."""
    return match.graph.call_method("reshape", (match["hidden"], -1, match.val("weight").shape[1]))


def count(match: Match) -> torch.fx.Node:
    """The number of non-ignored labels (int64, 0-dim): what HF's 'mean' divides the loss sum by."""
    graph = match.graph
    return graph.call_method("sum", (graph.call_function(operator.ne, (match["labels"], match["ignore_index"])),))


def reduce(match: Match, total: torch.fx.Node) -> torch.fx.Node:
    """HF's reduction of the per-token loss sum: as is for 'sum', over the non-ignored count for 'mean'."""
    if match["reduction"] == "sum":
        return total
    return match.graph.call_function(operator.truediv, (total, count(match)))


def replace(match: Match):
    graph = match.graph
    fused = match.call(torch.ops.cohere_fx.head_cross_entropy.default, rows(match), match["weight"],
                       match["labels"], float(match["logit_scale"]), match["ignore_index"])
    flat, per_token = (graph.call_function(operator.getitem, (fused, i)) for i in (0, 1))
    logits = graph.call_method("view", (flat, *match.val("hidden").shape[:-1], match["vocab_size"]))
    return reduce(match, graph.call_method("sum", (per_token,))), logits


PATTERN = Pattern("scaled_cross_entropy", search, replace, check, literals=LITERALS)
