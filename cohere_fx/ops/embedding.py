"""``cohere_fx::embedding``: the token embedding, with a backward that never builds an fp32 [V, H] gradient.

Why: inductor decomposes ``embedding_dense_backward`` into zeros in fp32 + an accumulating scatter + a cast to
the weight's dtype. At Cohere's 256 000 x 4096 vocabulary the fp32 buffer is 4 GB, written, scattered into and
read back at the very end of the backward, when every other gradient is already held: it was the peak of the
r7b-8L full fine-tune step. ATen's own kernel (what eager runs) sums each token's rows in fp32 and writes the
[V, H] gradient once in the weight's dtype. The op keeps that kernel out of inductor's reach; the forward is the
plain lookup.
"""
import torch
from torch import Tensor


@torch.library.custom_op("cohere_fx::embedding", mutates_args=())
def embedding(ids: Tensor, weight: Tensor, padding_idx: int) -> Tensor:
    """``F.embedding(ids, weight, padding_idx)``; ``padding_idx`` -1 for none (its row gets no gradient)."""
    return torch.nn.functional.embedding(ids, weight, None if padding_idx < 0 else padding_idx)


@embedding.register_fake
def _(ids, weight, padding_idx):
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op("cohere_fx::embedding_backward", mutates_args=())
def embedding_backward(grad: Tensor, ids: Tensor, num_weights: int, padding_idx: int) -> Tensor:
    return torch.ops.aten.embedding_dense_backward(grad, ids, num_weights, padding_idx, False)


@embedding_backward.register_fake
def _(grad, ids, num_weights, padding_idx):
    return grad.new_empty((num_weights, grad.shape[-1]))


def _setup_context(ctx, inputs, output):
    ids, weight, ctx.padding_idx = inputs
    ctx.num_weights = weight.shape[0]
    ctx.save_for_backward(ids)


def _backward(ctx, grad):
    if not ctx.needs_input_grad[1]:
        return None, None, None
    (ids,) = ctx.saved_tensors
    return None, embedding_backward(grad, ids, ctx.num_weights, ctx.padding_idx), None


embedding.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("cohere_fx::embedding_backward_add_", mutates_args=("out",))
def embedding_backward_add_(out: Tensor, grad: Tensor, ids: Tensor, padding_idx: int) -> None:
    """``out += embedding_backward(grad, ids, out.shape[0], padding_idx)`` touching only the looked-up rows.

    Why: a tied embedding's gradient is the head's [V, H] gradient plus the lookup's, which autograd builds dense
    (zeros, scatter) and adds (three [V, H] passes, ~8 GB at Cohere's vocabulary) although
    only the batch's tokens have rows. The ``tied_embedding_grad`` post-grad pass calls this instead.

    Values: each distinct token's rows are summed in fp32 and rounded once to the weight's dtype (ATen's
    embedding_dense_backward on the distinct tokens: a stable sort, segments, no host sync), then added to ``out``'s
    row with one rounding, as the dense add does; the other rows are untouched (the dense add adds zero).
    """
    if padding_idx >= 0:  # the padding row gets no gradient
        grad = grad.masked_fill((ids == padding_idx)[..., None], 0)
    flat_ids, flat_grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
    sorted_ids, order = torch.sort(flat_ids, stable=True)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    segment = first.cumsum(0) - 1  # index of each token's distinct id, in sorted order
    rows = torch.ops.aten.embedding_dense_backward(flat_grad[order], segment, flat_ids.numel(), -1, False)
    segment_ids = torch.zeros_like(sorted_ids).scatter_(0, segment, sorted_ids)  # unused segments: row 0, adding 0
    out.index_add_(0, segment_ids, rows.to(out.dtype))


@embedding_backward_add_.register_fake
def _(out, grad, ids, padding_idx):
    return None
