"""Activation memory under LoRA: values the backward keeps only for a LoRA A gradient are recomputed instead.

Why: with frozen base weights the backward needs a LoRA'd linear's input for one thing only, A's gradient
(``lora_shrink`` saves it). Three such inputs per Cohere layer are one cheap pass away from tensors the backward
keeps anyway: the SwiGLU output (from gate and up, which its own backward keeps; [tokens, 14336] bf16 per layer),
the input norm's output (from its input, which the norm's backward keeps) and the attention output laid out for
o_proj (a transpose + copy of what SDPA's backward keeps). tests/test_lora_ops.py checks with the partitioner
inductor uses that the forward then keeps no SwiGLU output.

How: the chain of cheap nodes that produces a ``lora_shrink`` input (cohere_fx's swiglu and layer_norm, views,
copies) is marked ``PREFER_RECOMPUTE``, the tag torch's selective activation checkpointing sets, which
aot_autograd copies from these nodes to the ATen nodes they trace into, and which the min-cut partitioner (what
inductor uses) honours. Values stay the same: a recomputation runs the same kernels on the same inputs. The
aot_autograd path without inductor (``inductor=False``) partitions without it and ignores the tags.
"""
import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

# What may be recomputed: a pass over one or two saved tensors, nothing that multiplies by a weight matrix.
_OPS = ("cohere_fx.swiglu.default", "cohere_fx.layer_norm.default")
_METHODS = ("contiguous", "view", "reshape", "transpose", "permute")


def _cheap(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _METHODS
    return node.op == "call_function" and str(node.target) in _OPS


def mark_lora_recompute(graph: torch.fx.Graph) -> None:
    """Marks the cheap producers of every lora_shrink input."""
    for shrink in graph.find_nodes(op="call_function", target=torch.ops.cohere_fx.lora_shrink.default):
        node = shrink.args[0]
        while isinstance(node, torch.fx.Node) and _cheap(node) and "recompute" not in node.meta:
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            node = node.args[0]
