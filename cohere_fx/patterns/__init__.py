"""The registry of fusions, in the order the pipeline applies them. One file per fusion."""
from cohere_fx.patterns import (causal_attention, layer_norm, qk_norm_rope, rope, scaled_cross_entropy,
                                sliding_attention)
from cohere_fx.patterns.base import Match, Pattern

PATTERNS: dict[str, Pattern] = {p.name: p for p in (qk_norm_rope.PATTERN, rope.PATTERN, causal_attention.PATTERN,
                                              sliding_attention.PATTERN, layer_norm.PATTERN,
                                              scaled_cross_entropy.PATTERN)}

__all__ = ["PATTERNS", "Match", "Pattern"]
