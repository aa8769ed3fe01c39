"""``linear_cross_entropy``: with ``options={"return_logits": False}``, Cohere's head and HF's loss ->
cohere_fx.linear_cross_entropy, and the model output's ``logits`` becomes None.

Training rarely reads the logits, yet the head is the largest activation of a Cohere model: [B, S, 256 000].
The op runs the head GEMM and the loss in chunks of rows and never builds the [N, V] logits (nor their
gradient): at r7b-8L B2 x S2048 that removes the 2 GB logits output and the 2 GB gradient. The match is the
same as ``scaled_cross_entropy``'s; it applies only when the logits feed nothing but the loss and the graph's
output, so dropping them from the output changes nothing else. Off by default: the model's outputs stay
exactly what HF returns unless the user asks.
"""
import torch

from cohere_fx.patterns import scaled_cross_entropy as head
from cohere_fx.patterns.base import Match, Pattern


def check(match: Match):
    reason = head.check(match)
    if reason is not None:
        return reason
    readers = [u.name for u in match.outputs[1].users if u.op != "output" and u not in match.nodes]
    return f"the logits are also read by {readers}" if readers else None


def replace(match: Match):
    """'mean' hands the count of non-ignored labels to the op as its divisor rather than dividing its sum: the op
    then computes the gradients of the mean in its forward, and the backward of an unscaled loss scales nothing.
    'sum' (HF's num_items_in_batch form) keeps the division that follows in the graph."""
    divisor = (head.count(match),) if match["reduction"] == "mean" else ()
    loss = match.call(torch.ops.cohere_fx.linear_cross_entropy.default, head.rows(match), match["weight"],
                      match["labels"], float(match["logit_scale"]), match["ignore_index"], *divisor)
    return loss, None


PATTERN = Pattern("linear_cross_entropy", head.search, replace, check, literals=head.LITERALS)
