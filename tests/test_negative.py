"""What must not be rewritten stays unchanged, and still runs correctly.

Near misses are planted inside a real Cohere model (as its final norm), so the pipeline runs and it is the
pattern's own checks that must refuse them; non-Cohere models are passed through untouched.
"""
import pytest
import torch
from transformers import CohereForCausalLM, LlamaConfig, LlamaForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere_config
from parity import assert_training_parity


class LayerNormWithBias(torch.nn.Module):
    """CohereLayerNorm's math plus a bias."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(n))

    def forward(self, x):
        h = x.to(torch.float32)
        mean = h.mean(-1, keepdim=True)
        variance = (h - mean).pow(2).mean(-1, keepdim=True)
        h = (h - mean) * torch.rsqrt(variance + 1e-5)
        h = self.weight.to(torch.float32) * h + self.bias
        return h.to(x.dtype)


class OnePassVarianceNorm(torch.nn.Module):
    """Looks like the pattern, but computes the variance as E[x^2] - E[x]^2 (different rounding)."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n))

    def forward(self, x):
        h = x.to(torch.float32)
        mean = h.mean(-1, keepdim=True)
        variance = h.pow(2).mean(-1, keepdim=True) - mean.pow(2)
        h = (h - mean) * torch.rsqrt(variance + 1e-5)
        return (self.weight.to(torch.float32) * h).to(x.dtype)


class NormOverSequence(torch.nn.Module):
    """The same math over the sequence dimension instead of the hidden dimension."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n))

    def forward(self, x):
        h = x.to(torch.float32)
        mean = h.mean(1, keepdim=True)
        variance = (h - mean).pow(2).mean(1, keepdim=True)
        h = (h - mean) * torch.rsqrt(variance + 1e-5)
        return (self.weight.to(torch.float32) * h).to(x.dtype)


@pytest.mark.parametrize("near_miss", [LayerNormWithBias, OnePassVarianceNorm, NormOverSequence])
def test_near_miss_final_norm_is_left_alone(near_miss):
    model = CohereForCausalLM(tiny_cohere_config(layers=2))
    model.model.norm = near_miss(model.config.hidden_size)
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids)
    assert report.matches["layer_norm"] == 2  # the two input norms; not the planted final norm
    assert_training_parity(model, ids, {"inductor": False}, tol=1e-5)


def test_llama_rmsnorm_model_is_unchanged_and_correct():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (2, 8))
    report = cohere_fx.explain(model, ids)
    assert all(count == 0 for count in report.matches.values())
    assert all(g.before == g.after and g.skipped for g in report.graphs)
    assert_training_parity(model, ids, {"inductor": False}, tol=1e-6)


def test_disabled_pattern_is_not_applied():
    model = CohereForCausalLM(tiny_cohere_config(layers=1))
    report = cohere_fx.explain(model, torch.randint(3, 128, (1, 5)), options={"passes": []})
    assert report.matches["layer_norm"] == 0
