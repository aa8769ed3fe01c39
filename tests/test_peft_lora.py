"""PEFT LoRA on all seven projections: every cohere_fx pattern still matches, and the LoRA gradients equal eager."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import CohereForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere_config
from parity import rel_err

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model, dropout):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_counts_match_the_plain_model(dropout):
    ids = torch.randint(3, 128, (2, 8))
    plain = CohereForCausalLM(tiny_cohere_config(layers=2))
    expected = cohere_fx.explain(plain, ids, labels=ids).matches
    lora = _lora(plain, dropout).train()
    assert cohere_fx.explain(lora, ids, labels=ids).matches == expected


def test_lora_gradients_match_eager():
    torch.manual_seed(0)
    model = _lora(CohereForCausalLM(tiny_cohere_config(layers=2)), 0.0)
    ids = torch.randint(3, 128, (2, 8))

    def grads(m):
        model.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager = grads(model)
    compiled = grads(torch.compile(model, backend="cohere_fx", options={"inductor": False}))
    assert eager and eager.keys() == compiled.keys()
    assert all(rel_err(compiled[n], eager[n]) < 1e-5 for n in eager)
