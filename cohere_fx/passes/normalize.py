"""Canonical spellings, so one pattern matches every way the same math is written.

Dynamo records tensor methods as they were called: ``x.float()``, ``x.to(torch.float32)`` and
``x.to(dtype=torch.float32)`` are three spellings of one cast. Patterns and model graphs both go through
``normalize_graph`` before matching, so a pattern is written once, like the HF source, and still matches.
Only rewrites that are exact (same tensor, same dtype) are done here.
"""
from typing import Callable

import torch
import torch.fx

_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def _is_plain_dtype_cast(node: torch.fx.Node) -> bool:
    """``x.to(dtype=d)`` with nothing else (no device, copy, non_blocking, memory_format)."""
    return node.op == "call_method" and node.target == "to" and len(node.args) == 1 and set(node.kwargs) == {"dtype"}


def normalize_graph(graph: torch.fx.Graph) -> Callable[[], None]:
    """Rewrite casts to the one spelling ``x.to(dtype)``; returns a function that restores the old spellings
    (the pipeline leaves a graph in which nothing matched exactly as it came)."""
    originals = []
    for node in graph.nodes:
        if node.op != "call_method":
            continue
        if node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
            originals.append((node, node.target, node.args, node.kwargs))
            node.args = (node.args[0], _CAST_METHODS[node.target])
            node.target = "to"
        elif _is_plain_dtype_cast(node):
            originals.append((node, node.target, node.args, node.kwargs))
            node.args = (node.args[0], node.kwargs["dtype"])
            node.kwargs = {}

    def restore():
        for node, target, args, kwargs in originals:
            node.target, node.args, node.kwargs = target, args, kwargs

    return restore
