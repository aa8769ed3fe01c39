"""The ``scaled_cross_entropy`` fusion in whole models: HF's loss with logit_scale, ignored labels, 'mean' and
the 'sum' / num_items_in_batch form of gradient accumulation — loss and every gradient vs eager."""
import pytest
import torch
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
def test_loss_and_gradients_match_eager(logit_scale, dtype, tol, num_items):
    model = CohereForCausalLM(tiny_cohere_config(layers=1, logit_scale=logit_scale)).to(dtype)
    ids = torch.randint(3, 128, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100  # prompt tokens excluded from the loss
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    report = cohere_fx.explain(model, ids, labels=labels, **kwargs)
    assert report.matches["scaled_cross_entropy"] == 1
    loss_e, grads_e = _loss_and_grads(model, ids, labels, **kwargs)
    compiled = torch.compile(model, backend="cohere_fx", options={"inductor": False})
    loss_c, grads_c = _loss_and_grads(compiled, ids, labels, **kwargs)
    assert rel_err(loss_c, loss_e) < tol
    assert all(rel_err(grads_c[n], grads_e[n]) < tol for n in grads_e)


def test_the_fp32_logits_copy_is_gone_from_the_graph():
    model = CohereForCausalLM(tiny_cohere_config(layers=1, vocab_size=256)).to(torch.bfloat16)
    ids = torch.randint(3, 256, (2, 8))
    after = cohere_fx.explain(model, ids, labels=ids).graphs[0].after
    assert "cohere_fx.scaled_cross_entropy(" in after
    assert "f32[2, 8, 256]" not in after and "f32[16, 256]" not in after  # no fp32 [B, S, V] or [N, V] tensor
