"""The head-and-loss fusions in whole models: ``scaled_cross_entropy`` (logits returned) and
``linear_cross_entropy`` (``return_logits=False``) — HF's loss with logit_scale, ignored labels, 'mean' and the
'sum' / num_items_in_batch form of gradient accumulation: loss and every gradient vs eager; what each keeps."""
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from transformers import CohereForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere_config
from parity import rel_err


def _loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels, **kwargs).loss
    loss.backward()
    module = getattr(model, "_orig_mod", model)
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("logit_scale", [0.0625, 0.25, 0.8333])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_items", [None, 17])
@pytest.mark.parametrize("return_logits", [True, False])
def test_loss_and_gradients_match_eager(logit_scale, dtype, tol, num_items, return_logits):
    model = CohereForCausalLM(tiny_cohere_config(layers=1, logit_scale=logit_scale)).to(dtype)
    ids = torch.randint(3, 128, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100  # prompt tokens excluded from the loss
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    options = {"inductor": False, "return_logits": return_logits}
    report = cohere_fx.explain(model, ids, labels=labels, options=options, **kwargs)
    fused = "scaled_cross_entropy" if return_logits else "linear_cross_entropy"
    assert report.matches[fused] == 1 and sum(report.matches[n] for n in HEAD_PATTERNS) == 1
    loss_e, grads_e = _loss_and_grads(model, ids, labels, **kwargs)
    compiled = torch.compile(model, backend="cohere_fx", options=options)
    loss_c, grads_c = _loss_and_grads(compiled, ids, labels, **kwargs)
    assert rel_err(loss_c, loss_e) < tol
    assert all(rel_err(grads_c[n], grads_e[n]) < tol for n in grads_e)


HEAD_PATTERNS = ("scaled_cross_entropy", "linear_cross_entropy")


@pytest.mark.parametrize("num_items", [None, 7])
def test_mean_divides_inside_linear_cross_entropy(num_items):
    """'mean' hands the count of non-ignored labels to the op as its divisor, so the op's forward computes the
    mean's gradients and nothing divides after it; 'sum' (num_items_in_batch) keeps HF's division."""
    model = CohereForCausalLM(tiny_cohere_config(layers=1))
    ids = torch.randint(3, 128, (2, 8))
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    after = cohere_fx.explain(model, ids, labels=ids, options={"return_logits": False}, **kwargs).graphs[0].after
    (call,) = [line for line in after.splitlines() if "cohere_fx.linear_cross_entropy(" in line]
    args = call[call.index("(") + 1:-1].split(", ")
    divided = " = linear_cross_entropy / " in after
    if num_items is None:
        assert len(args) == 6 and re.search(rf"^ *{args[-1]}\b.* = \w+\.sum\(\)$", after, re.M) and not divided
    else:
        assert len(args) == 5 and divided


def test_compiled_backward_scales_the_weight_gradient_in_place():
    """Inductor (the default): the head's weight gradient, computed in the op's forward, gets the loss gradient's
    scale in one pass that writes the saved buffer, and the tied embedding's rows are added into it in place
    (tied_embedding_grad): the post-grad backward has no clone or copy of a [V, H] tensor, and its code allocates
    none. The gradients are eager's."""
    model = CohereForCausalLM(tiny_cohere_config(layers=1))
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    ids = torch.randint(3, vocab, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    loss_e, grads_e = _loss_and_grads(model, ids, labels)
    graphs = []
    options = {"return_logits": False, "inductor_config": {"post_grad_custom_post_pass": graphs.append}}
    compiled = torch.compile(model, backend="cohere_fx", options=options)
    (loss_c, grads_c), codes = run_and_get_code(_loss_and_grads, compiled, ids, labels)
    assert rel_err(loss_c, loss_e) < 1e-5 and all(rel_err(grads_c[n], grads_e[n]) < 1e-5 for n in grads_e)

    (backward,) = [g for g in graphs if any("tangents" in n.name for n in g.find_nodes(op="placeholder"))]
    weight_sized = [n for n in backward.nodes if n.op == "call_function" and _shape(n) == (vocab, hidden)]
    assert {n.target for n in weight_sized} == {torch.ops.aten.mul.Tensor}
    assert backward.find_nodes(op="call_function", target=torch.ops.cohere_fx.embedding_backward_add_.default)
    (code,) = [c for c in codes if "tangents" in c]
    assert not re.search(rf"empty_strided_\w+\(\({vocab}, {hidden}\)", code)


def _shape(node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def test_return_logits_false_returns_no_logits_and_default_returns_hf_logits():
    model = CohereForCausalLM(tiny_cohere_config(layers=1))
    ids = torch.randint(3, 128, (2, 8))
    ref = model(ids, labels=ids)
    out = torch.compile(model, backend="cohere_fx", options={"inductor": False})(ids, labels=ids)
    assert rel_err(out.logits, ref.logits) < 1e-6
    torch._dynamo.reset()
    out = torch.compile(model, backend="cohere_fx", options={"inductor": False, "return_logits": False})(
        ids, labels=ids)
    assert out.logits is None and rel_err(out.loss, ref.loss) < 1e-6
    torch._dynamo.reset()
    with torch.no_grad():  # no labels: nothing to fuse the head into, the logits stay
        out = torch.compile(model, backend="cohere_fx", options={"inductor": False, "return_logits": False})(ids)
    assert rel_err(out.logits, model(ids).logits) < 1e-6


def _tensor_sizes(model, ids, return_logits):
    """numel of every tensor in the forward and backward graphs aot_autograd hands to the compiler."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from cohere_fx.backend import Options
    from cohere_fx.passes import CohereFxPasses

    sizes = []

    def record(gm, _inputs):
        sizes.extend(n.meta["val"].numel() for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor))
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        CohereFxPasses(Options(return_logits=return_logits).pattern_names()).run(gm)
        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(ids, labels=ids, use_cache=False).loss.backward()
    torch._dynamo.reset()
    return sizes


def test_return_logits_false_builds_no_logits_sized_tensor():
    """No [B, S, V] tensor (nor its fp32 copy or gradient) in the forward or backward graph; the control run with
    logits has them. Inside the op, rows go through the head in chunks (tests/test_cross_entropy.py)."""
    vocab, (batch, seq) = 1024, (2, 40)  # B*S*V > the V*H embedding, so the check can tell them apart
    model = CohereForCausalLM(tiny_cohere_config(layers=1, vocab_size=vocab))
    ids = torch.randint(3, vocab, (batch, seq))
    assert max(_tensor_sizes(model, ids, return_logits=True)) >= batch * seq * vocab
    assert max(_tensor_sizes(model, ids, return_logits=False)) < batch * seq * vocab


def test_logits_read_by_more_than_the_loss_are_kept():
    """A user model that reads the scaled logits again (here: a z-loss term) keeps them: linear_cross_entropy
    refuses the match and scaled_cross_entropy takes it."""
    class ZLoss(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, labels):
            out = self.lm(input_ids, labels=labels, use_cache=False)
            return out.loss + 1e-4 * out.logits.float().logsumexp(-1).pow(2).mean()

    model = ZLoss(CohereForCausalLM(tiny_cohere_config(layers=1)))
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, ids, options={"return_logits": False})
    assert report.matches["linear_cross_entropy"] == 0 and report.matches["scaled_cross_entropy"] == 1
    loss_c = torch.compile(model, backend="cohere_fx", options={"inductor": False, "return_logits": False})(ids, ids)
    assert rel_err(loss_c, model(ids, ids)) < 1e-6


def test_generation_sends_only_the_kept_positions_through_the_head():
    model = CohereForCausalLM(tiny_cohere_config(layers=1)).eval()
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        after = cohere_fx.explain(model, ids, logits_to_keep=1).graphs[0].after
        out = torch.compile(model, backend="cohere_fx", options={"inductor": False})(ids, logits_to_keep=1)
    head = [line for line in after.splitlines() if "embed_tokens.weight" in line and "linear(" in line]
    # F.linear, or decode_linear (these are few rows) whose output is a one-element tuple
    assert len(head) == 1 and head[0].lstrip().split(" = ")[0].rstrip(")").endswith("f32[2, 1, 128]"), head
    assert out.logits.shape == (2, 1, 128) and rel_err(out.logits, model(ids).logits[:, -1:]) < 1e-6


def test_the_fp32_logits_copy_is_gone_from_the_graph():
    model = CohereForCausalLM(tiny_cohere_config(layers=1, vocab_size=256)).to(torch.bfloat16)
    ids = torch.randint(3, 256, (2, 8))
    after = cohere_fx.explain(model, ids, labels=ids).graphs[0].after
    assert "cohere_fx.head_cross_entropy(" in after
    assert "f32[2, 8, 256]" not in after and "f32[16, 256]" not in after  # no fp32 [B, S, V] or [N, V] tensor
