"""Whole models on a GPU, bf16, through inductor: the compiled Triton kernels, flash attention and flex
attention in one graph, training and inference, against eager HF."""
import pytest
import torch
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from parity import assert_training_parity, rel_err

pytestmark = pytest.mark.gpu


def _bf16_cuda(model):
    return model.to("cuda", torch.bfloat16)


def test_cohere_qk_norm_training_through_inductor():
    from torch._dynamo.utils import counters

    counters.clear()
    model = _bf16_cuda(CohereForCausalLM(tiny_cohere_config(layers=2, head_dim=128, heads=4, kv_heads=2)))
    ids = torch.randint(3, 128, (2, 256), device="cuda")
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches["qk_norm_rope"] == 2 and report.matches["causal_attention"] == 2
    assert report.matches["layer_norm"] == 3 and report.matches["scaled_cross_entropy"] == 1
    assert_training_parity(model, ids, {"inductor": True}, tol=3e-2)
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0


def test_cohere2_sliding_window_training_through_inductor():
    model = _bf16_cuda(Cohere2ForCausalLM(tiny_cohere2_config(layers=4, head_dim=64, sliding_window=128)))
    ids = torch.randint(3, 128, (2, 384), device="cuda")
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches["sliding_attention"] == 3 and report.matches["rope"] == 3
    assert report.matches["causal_attention"] == 1
    assert_training_parity(model, ids, {"inductor": True}, tol=3e-2)


def test_cohere_mha_inference_through_inductor():
    model = _bf16_cuda(CohereForCausalLM(tiny_cohere_config(layers=2, use_qk_norm=False, kv_heads=4, head_dim=128)))
    ids = torch.randint(3, 128, (3, 200), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="cohere_fx")(ids).logits
    assert rel_err(out, ref) < 2e-2
