"""``embedding``: the op is F.embedding forward and backward (padding row included), the pattern matches the token
embedding of Cohere and Cohere2, training is bitwise unchanged by it, and the backward inductor would compile
holds no fp32 [V, H] gradient buffer (the control without the pattern does).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from parity import train_step
from torch._dynamo.backends.common import aot_autograd
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
import cohere_fx.backend
import cohere_fx.ops  # registers torch.ops.cohere_fx.*
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from cohere_fx.passes import CohereFxPasses

MODELS = {
    "cohere": lambda: CohereForCausalLM(tiny_cohere_config(layers=2)),
    "cohere2": lambda: Cohere2ForCausalLM(tiny_cohere2_config(layers=4)),
}


@pytest.mark.parametrize("padding_idx", [None, 0, 5, -3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_is_f_embedding_forward_and_backward(padding_idx, dtype):
    weight = torch.randn(20, 8, dtype=dtype, requires_grad=True)
    ids = torch.tensor([[0, 5, 5, 17], [3, 5, 0, 19]])  # repeated rows, and the padding row where there is one
    grad = torch.randn(2, 4, 8, dtype=dtype)
    want = F.embedding(ids, weight, padding_idx)
    (want_grad,) = torch.autograd.grad(want, weight, grad)
    normalised = -1 if padding_idx is None else padding_idx % 20
    got = torch.ops.cohere_fx.embedding(ids, weight, normalised)
    (got_grad,) = torch.autograd.grad(got, weight, grad)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_opcheck():
    weight = torch.randn(20, 8, requires_grad=True)
    ids = torch.randint(0, 20, (2, 5))
    torch.library.opcheck(torch.ops.cohere_fx.embedding.default, (ids, weight, 0))
    torch.library.opcheck(torch.ops.cohere_fx.embedding_backward.default, (torch.randn(2, 5, 8), ids, 20, -1))


@pytest.mark.parametrize("arch", MODELS)
def test_one_match_and_bitwise_training(arch):
    model = MODELS[arch]().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 12))
    ids[0, :3] = model.config.pad_token_id  # the padding row gets no gradient from the lookup
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches["embedding"] == 1 and not report.near_misses["embedding"]
    runs = []
    for passes in ([], ["embedding"]):
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="cohere_fx",
                                 options={"inductor": False, "passes": passes})
        runs.append(train_step(compiled, ids))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = runs
    assert torch.equal(logits_a, logits_b) and torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("attribute", ["max_norm", "scale_grad_by_freq"])
def test_other_lookups_are_left_alone(attribute):
    """max_norm renormalises the weight in place, scale_grad_by_freq scales the gradient: not what the op does."""
    model = MODELS["cohere"]()
    setattr(model.model.embed_tokens, attribute, {"max_norm": 1.0, "scale_grad_by_freq": True}[attribute])
    ids = torch.randint(3, 128, (2, 8))
    assert cohere_fx.explain(model, ids, labels=ids).matches["embedding"] == 0


def _backward_graph_tensors(model, ids, passes):
    """(dtype, shape) of every tensor in the training backward, traced with inductor's decompositions (what
    inductor would compile) after the given patterns."""
    from torch._inductor.decomposition import select_decomp_table

    found = []

    def record(graph, _):
        found.extend((n.meta["val"].dtype, tuple(n.meta["val"].shape)) for n in graph.graph.nodes
                     if isinstance(n.meta.get("val"), torch.Tensor))
        return make_boxed_func(graph.forward)

    def backend(gm, example_inputs):
        CohereFxPasses(passes).run(gm)
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward), bw_compiler=record,
                            decompositions=select_decomp_table())(gm, example_inputs)

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    return found


def test_backward_holds_no_fp32_vocabulary_buffer():
    model = MODELS["cohere"]().to(torch.bfloat16).train()
    ids = torch.randint(3, 128, (2, 12))
    vocab_fp32 = (torch.float32, tuple(model.model.embed_tokens.weight.shape))
    defaults = cohere_fx.backend.Options().pattern_names()
    without = _backward_graph_tensors(copy.deepcopy(model), ids, tuple(n for n in defaults if n != "embedding"))
    assert vocab_fp32 in without  # the control: inductor's decomposition accumulates in fp32
    assert vocab_fp32 not in _backward_graph_tensors(model, ids, defaults)
