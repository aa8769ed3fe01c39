"""What must not be rewritten stays unchanged, and still runs correctly."""
import torch
from transformers import CohereForCausalLM, LlamaConfig, LlamaForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere_config
from parity import assert_training_parity


class LayerNormWithBias(torch.nn.Module):
    """CohereLayerNorm's math plus a bias: not the op's math, so it must not match."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))
        self.bias = torch.nn.Parameter(torch.randn(n))

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
        self.weight = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        h = x.to(torch.float32)
        mean = h.mean(-1, keepdim=True)
        variance = h.pow(2).mean(-1, keepdim=True) - mean.pow(2)
        h = (h - mean) * torch.rsqrt(variance + 1e-5)
        return (self.weight.to(torch.float32) * h).to(x.dtype)


class NormOverOtherDim(torch.nn.Module):
    """The same math over dim 0 instead of the last dim."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        h = x.to(torch.float32)
        mean = h.mean(0, keepdim=True)
        variance = (h - mean).pow(2).mean(0, keepdim=True)
        h = (h - mean) * torch.rsqrt(variance + 1e-5)
        return (self.weight.to(torch.float32) * h).to(x.dtype)


def _assert_untouched(module, x):
    report = cohere_fx.explain(module, x)
    assert all(count == 0 for count in report.matches.values()), report.matches
    assert report.graphs and report.graphs[0].before == report.graphs[0].after
    compiled = torch.compile(module, backend="cohere_fx", options={"inductor": False})
    torch.testing.assert_close(compiled(x), module(x))


def test_layer_norm_with_bias_is_left_alone():
    _assert_untouched(LayerNormWithBias(16), torch.randn(3, 16))


def test_one_pass_variance_is_left_alone():
    _assert_untouched(OnePassVarianceNorm(16), torch.randn(3, 16))


def test_norm_over_another_dim_is_left_alone():
    _assert_untouched(NormOverOtherDim(3), torch.randn(3, 16).t())


def test_llama_rmsnorm_model_is_unchanged_and_correct():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (2, 8))
    report = cohere_fx.explain(model, ids)
    assert all(count == 0 for count in report.matches.values())
    assert all(g.before == g.after for g in report.graphs)
    assert_training_parity(model, ids, {"inductor": False}, tol=1e-6)


def test_disabled_pattern_is_not_applied():
    model = CohereForCausalLM(tiny_cohere_config(layers=1))
    report = cohere_fx.explain(model, torch.randint(3, 128, (1, 5)), options={"passes": []})
    assert report.matches["layer_norm"] == 0
