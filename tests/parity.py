"""Shared checks: run a model eagerly and compiled with cohere_fx, compare logits, loss and every gradient."""
import copy

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def train_step(model, input_ids, **kwargs):
    """Forward with labels and backward; returns (logits, loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids, **kwargs)
    out.loss.backward()
    module = getattr(model, "_orig_mod", model)  # a compiled model's parameters keep their eager names
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_training_parity(model, input_ids, options, tol, **kwargs):
    """Eager HF vs torch.compile(backend="cohere_fx"): logits, loss and all parameter gradients."""
    eager = copy.deepcopy(model)
    logits_e, loss_e, grads_e = train_step(eager, input_ids, **kwargs)
    compiled = torch.compile(model, backend="cohere_fx", options=options)
    logits_c, loss_c, grads_c = train_step(compiled, input_ids, **kwargs)
    assert rel_err(logits_c, logits_e) < tol, rel_err(logits_c, logits_e)
    assert rel_err(loss_c, loss_e) < tol
    assert grads_c.keys() == grads_e.keys() and grads_e
    worst = max(grads_e, key=lambda n: rel_err(grads_c[n], grads_e[n]))
    assert rel_err(grads_c[worst], grads_e[worst]) < tol, (worst, rel_err(grads_c[worst], grads_e[worst]))
