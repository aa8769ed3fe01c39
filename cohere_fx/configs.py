"""Built-in model configs: tiny ones for demos and CPU tests, and the real Cohere shapes for benchmarks.

Real shapes come from ../shared/FACTS.md §3 (public configs; the Hub checkpoints are gated). Every config
uses attn_implementation "sdpa", the path HF takes by default on GPUs.
"""
from transformers import Cohere2Config, CohereConfig

_COMMON = dict(vocab_size=256000, layer_norm_eps=1e-5, pad_token_id=0, bos_token_id=5, eos_token_id=255001,
               tie_word_embeddings=True, max_position_embeddings=8192)

REAL = {
    "command-r": (CohereConfig, dict(hidden_size=8192, num_hidden_layers=40, num_attention_heads=64,
                                     num_key_value_heads=64, intermediate_size=22528, logit_scale=0.0625,
                                     use_qk_norm=False, rope_theta=8e6)),
    "command-r-08-2024": (CohereConfig, dict(hidden_size=8192, num_hidden_layers=40, num_attention_heads=64,
                                             num_key_value_heads=8, intermediate_size=24576, logit_scale=0.0625,
                                             use_qk_norm=False, rope_theta=4e6)),
    "command-r-plus": (CohereConfig, dict(hidden_size=12288, num_hidden_layers=64, num_attention_heads=96,
                                          num_key_value_heads=8, intermediate_size=33792, logit_scale=0.8333,
                                          use_qk_norm=True, rope_theta=7.5e7)),
    "command-r7b": (Cohere2Config, dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                        num_key_value_heads=8, intermediate_size=14336, logit_scale=0.25,
                                        rope_theta=50000.0, sliding_window=4096)),
    "command-a": (Cohere2Config, dict(hidden_size=12288, num_hidden_layers=64, num_attention_heads=96,
                                      num_key_value_heads=8, intermediate_size=36864, logit_scale=0.25,
                                      rope_theta=50000.0, sliding_window=4096)),
    # The anchor workload of ../shared/anchors: Command-R7B dims on the v1 (Cohere) architecture, QK-norm on.
    "r7b-8L": (CohereConfig, dict(hidden_size=4096, num_hidden_layers=8, num_attention_heads=32,
                                  num_key_value_heads=8, intermediate_size=14336, logit_scale=0.25,
                                  use_qk_norm=True, rope_theta=50000.0)),
}


def preset_config(name: str, layers: int = None):
    """A real model's config by preset name, optionally truncated to ``layers`` layers."""
    if name not in REAL:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(REAL)}")
    cls, shape = REAL[name]
    config = cls(**_COMMON, **shape)
    if layers is not None:
        config.num_hidden_layers = layers
        if hasattr(config, "layer_types") and config.layer_types is not None:
            config.layer_types = config.layer_types[:layers]
    config._attn_implementation = "sdpa"
    return config


def tiny_cohere_config(layers=2, heads=4, kv_heads=2, head_dim=16, use_qk_norm=True, logit_scale=0.25,
                       layer_norm_eps=1e-5, vocab_size=128, **overrides) -> CohereConfig:
    config = CohereConfig(vocab_size=vocab_size, hidden_size=heads * head_dim, intermediate_size=4 * heads * head_dim,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          use_qk_norm=use_qk_norm, logit_scale=logit_scale, layer_norm_eps=layer_norm_eps,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    config._attn_implementation = "sdpa"
    return config


def tiny_cohere2_config(layers=4, heads=4, kv_heads=2, head_dim=16, sliding_window=4, logit_scale=0.25,
                        vocab_size=128, **overrides) -> Cohere2Config:
    config = Cohere2Config(vocab_size=vocab_size, hidden_size=heads * head_dim,
                           intermediate_size=4 * heads * head_dim, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, sliding_window=sliding_window,
                           logit_scale=logit_scale, pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    config._attn_implementation = "sdpa"
    return config
