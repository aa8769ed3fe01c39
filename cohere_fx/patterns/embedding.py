"""``embedding``: the token embedding (``nn.Embedding`` as CohereModel calls it) -> cohere_fx.embedding.

The lookup itself is unchanged; what changes is its backward (see cohere_fx/ops/embedding.py): no fp32 [V, H]
buffer. ``padding_idx`` is read from the graph (Cohere's is the pad token id, or None). Lookups with a
``max_norm`` (which renormalises the weight in place), ``scale_grad_by_freq`` or a sparse gradient spell other
constants and do not match.
"""
import torch
import torch.nn.functional as F

from cohere_fx.patterns.base import Match, Pattern

# Dynamo records nn.Embedding's F.embedding call as one node; symbolic_trace would trace into F.embedding's
# Python body unless the call is a leaf.
embedding = F.embedding
torch.fx.wrap("embedding")


def search(ids, weight, padding_idx):
    return embedding(ids, weight, padding_idx, None, 2.0, False, False)


def _padding_idx(match: Match) -> int:
    """F.embedding's own normalisation: None -> -1, negative -> counted from the end."""
    padding_idx, rows = match["padding_idx"], match.val("weight").shape[0]
    return -1 if padding_idx is None else padding_idx + rows if padding_idx < 0 else padding_idx


def check(match: Match):
    ids, weight = match.val("ids"), match.val("weight")
    if ids is None or weight is None:
        return "no traced shapes"
    if weight.dim() != 2:
        return f"weight of shape {tuple(weight.shape)} is not [vocab, hidden]"
    if ids.dtype not in (torch.int32, torch.int64):
        return f"ids of dtype {ids.dtype}"
    padding_idx = match["padding_idx"]
    if padding_idx is not None and not (isinstance(padding_idx, int) and -weight.shape[0] <= padding_idx
                                        < weight.shape[0]):
        return f"padding_idx {padding_idx!r} is not a row of the weight"
    return None


def replace(match: Match):
    return match.call(torch.ops.cohere_fx.embedding.default, match["ids"], match["weight"], _padding_idx(match))


PATTERN = Pattern("embedding", search, replace, check, literals=("padding_idx",))
