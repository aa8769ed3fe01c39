"""``decode_linear``: in a decode step, the linear layers that read one activation -> one cohere_fx.decode_linear.

Why: a decode step's linear layers are matrix-vector products bound by streaming their weights. In Cohere's
parallel block q, k, v, gate and up all read the one LayerNorm output: cuBLAS runs them as five launches, three
of them split-K with a reduction kernel each; the op streams all five in one launch. Every other linear (o, down,
the head) goes through the op alone, also faster than cuBLAS's split-K kernels there (H100 figures in
kernels/decode_linear.py).

When it applies: the graph computes no gradient (neither the linear's traced output nor any graph output
requires grad: a decode step under ``torch.no_grad``), the input has at most 16 rows (decode batches; prefill keeps cuBLAS GEMMs),
no bias, weights of the input's dtype. Exactness: each output is the same fp32 dot product rounded once; only the
order of the accumulation differs (as with any other GEMM kernel).
"""
import operator
from typing import Optional

import torch
import torch.fx

from cohere_fx.kernels.decode_linear import MAX_ROWS, MAX_WEIGHTS
from cohere_fx.patterns.base import Match, SiblingPattern, fake_value, known_equal


def search(x, weight):
    return torch.nn.functional.linear(x, weight, None)


def _rows(x) -> Optional[int]:
    if x is None or not all(isinstance(s, int) for s in x.shape) or x.dim() < 2 or not x.shape[-1]:
        return None
    return x.numel() // x.shape[-1]


def _computes_gradients(graph: torch.fx.Graph) -> bool:
    """Whether any output of the graph requires grad (a training graph: its frozen layers, such as the base
    linears under LoRA, have outputs that need no gradient, and those are not decode steps)."""
    (output,) = graph.find_nodes(op="output")
    values = [fake_value(n) for n in output.all_input_nodes]
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _decode_member(match: Match) -> bool:
    """An inference linear on a decode step's few rows."""
    out, rows = fake_value(match.outputs[0]), _rows(match.val("x"))
    return (isinstance(out, torch.Tensor) and not out.requires_grad and rows is not None and rows <= MAX_ROWS
            and not _computes_gradients(match.graph))


def check(match: Match) -> Optional[str]:
    x, weights = match.val("x"), [fake_value(w) for w in match["weights"]]
    if x is None or any(w is None for w in weights):
        return "no traced shapes"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"input dtype {x.dtype}"
    for w in weights:
        if w.dim() != 2 or not known_equal(w.shape[1], x.shape[-1]) or not isinstance(w.shape[0], int):
            return f"weight {tuple(w.shape)} is not [N, {x.shape[-1]}]"
        if w.dtype != x.dtype or w.device != x.device or not w.is_contiguous():
            return f"weight is {w.dtype} on {w.device} (contiguous: {w.is_contiguous()}), input is {x.dtype} " \
                   f"on {x.device}"
    return None


def replace(match: Match):
    graph = match.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    weights = list(match["weights"])
    after = max([match.outputs[0], *weights], key=order.__getitem__)
    with graph.inserting_before(after.next):
        fused = match.call(torch.ops.cohere_fx.decode_linear.default, match["x"], weights)
        fused.meta["example_value"] = [fake_value(out) for out in match.outputs]
        return tuple(graph.call_function(operator.getitem, (fused, i)) for i in range(len(weights)))


PATTERN = SiblingPattern("decode_linear", search, replace, check, member=_decode_member, min_size=lambda match: 1,
                         max_size=MAX_WEIGHTS)
