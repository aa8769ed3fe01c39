"""``tied_embedding_grad``: in the backward graph, ``head_grad + embedding_backward(...)`` -> the lookup's rows added
into the head's gradient in place (cohere_fx.embedding_backward_add_).

Why: Cohere ties ``lm_head`` to ``embed_tokens``, so autograd adds two [256 000, 4096] gradients: the head's and the
lookup's, which ``embedding_backward`` builds dense (zeros, then the batch's rows). That is three full passes over
2 GB tensors (~8 GB moved per step) for a sum whose second term has a few thousand
non-zero rows. The sum of two gradients exists only after autograd, so this is the project's one post-grad pass
(inductor's ``post_grad_custom_post_pass``, ahead of any the user gives), not a pattern on the Dynamo graph; it runs
in compiles through inductor only and is reported by inductor's generated code, not by ``explain``.

When: the add's other term is produced in the backward graph (not a graph input: it may be overwritten) and read by
nothing else, with the dense gradient's shape and dtype. The values are the dense add's (see the op).
"""
import hashlib
from pathlib import Path

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

NAME = "tied_embedding_grad"


def _dense_lookup_grad(node) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target is torch.ops.cohere_fx.embedding_backward.default and len(node.users) == 1)


def _overwritable(node, like: torch.fx.Node) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or len(node.users) != 1:
        return False
    value, dense = node.meta.get("val"), like.meta.get("val")
    return (isinstance(value, torch.Tensor) and value.shape == dense.shape and value.dtype == dense.dtype
            and value.is_contiguous())


def fuse_tied_embedding_grads(graph: torch.fx.Graph) -> int:
    """Rewrites every match in ``graph``; returns how many."""
    count = 0
    for add in graph.find_nodes(op="call_function", target=torch.ops.aten.add.Tensor):
        if len(add.args) != 2 or add.kwargs:
            continue
        for dense, other in (add.args, reversed(add.args)):
            if _dense_lookup_grad(dense) and _overwritable(other, dense):
                grad, ids, _, padding_idx = dense.args
                with graph.inserting_before(add):
                    graph.call_function(torch.ops.cohere_fx.embedding_backward_add_.default,
                                        (other, grad, ids, padding_idx))
                add.replace_all_uses_with(other)
                graph.erase_node(add)
                graph.erase_node(dense)
                count += 1
                break
    if count:
        torch._dynamo.utils.counters["cohere_fx"][NAME] += count
    return count


class TiedEmbeddingGradPass(CustomGraphPass):
    """The inductor hook, then ``then`` (a post-grad pass the user gave in ``inductor_config``), as torch 2.11 takes
    one pass per hook. ``uuid`` hashes this file (and ``then``'s uuid), so inductor's FX graph cache stays on; a
    ``then`` without a uuid makes it None, and inductor bypasses the cache as it would for that pass alone."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, graph: torch.fx.Graph) -> None:
        fuse_tied_embedding_grads(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        then = self.then.uuid() if isinstance(self.then, CustomGraphPass) else None
        if self.then is not None and not then:
            return None
        return hashlib.sha256(Path(__file__).read_bytes() + repr(then).encode()).digest()
