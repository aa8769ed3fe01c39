"""``scaled_cross_entropy``: HF's ForCausalLMLoss on the scaled logits -> cohere_fx.scaled_cross_entropy.

HF upcasts the [B, S, 256 000] logits to fp32 and runs ``F.cross_entropy``, which keeps an fp32 log-softmax for
the backward and writes an fp32 gradient: at B2 x S2048 that is ~4 GB per copy. The op reads the bf16 logits
and writes the bf16 gradient, chunk by chunk over the vocabulary, with fp32 accumulation. The scaled logits are
a model output (``CausalLMOutput.logits``), so they stay materialised and the op runs with scale 1.0 on them
(exact: ``x * 1.0`` rounds to ``x``). 'mean' divides the sum by the count of non-ignored labels, as
F.cross_entropy does; 'sum' is what HF uses with ``num_items_in_batch`` (the division follows unchanged).
"""
import operator

import torch
import torch.nn.functional as F

from cohere_fx.patterns.base import Match, Pattern

# Dynamo records F.cross_entropy as one call; symbolic_trace would trace into it unless told it is a leaf.
cross_entropy = F.cross_entropy
torch.fx.wrap("cross_entropy")


def search(logits, labels, vocab_size, ignore_index, reduction):
    logits = logits.to(torch.float32)
    logits = logits.view(-1, vocab_size)
    return cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def check(match: Match):
    logits, labels = match.val("logits"), match.val("labels")
    if logits is None or labels is None:
        return "no traced shapes"
    if match["reduction"] not in ("mean", "sum"):
        return f"reduction={match['reduction']!r}"
    if logits.shape[-1] != match["vocab_size"] or labels.dtype != torch.int64 or labels.dim() != 1:
        return f"logits {tuple(logits.shape)} / labels {labels.dtype}{tuple(labels.shape)} are not [.., V] / [N]"
    if logits.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"logits dtype {logits.dtype}"
    if not isinstance(match["ignore_index"], int):
        return f"ignore_index is {match['ignore_index']!r}"
    return None


def replace(match: Match):
    graph, labels = match.graph, match["labels"]
    rows = graph.call_method("view", (match["logits"], -1, match["vocab_size"]))
    fused = match.call(torch.ops.cohere_fx.scaled_cross_entropy.default, rows, labels, 1.0, match["ignore_index"])
    per_token = graph.call_function(operator.getitem, (fused, 0))
    total = graph.call_method("sum", (per_token,))
    if match["reduction"] == "sum":
        return total
    count = graph.call_method("sum", (graph.call_function(operator.ne, (labels, match["ignore_index"])),))
    return graph.call_function(operator.truediv, (total, count))


PATTERN = Pattern("scaled_cross_entropy", search, replace, check, literals=("vocab_size", "ignore_index", "reduction"))
