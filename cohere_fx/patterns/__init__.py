"""The registry of fusions, in the order the pipeline applies them. One file per fusion."""
from cohere_fx.patterns import layer_norm
from cohere_fx.patterns.base import Match, Pattern

PATTERNS: dict[str, Pattern] = {p.name: p for p in (layer_norm.PATTERN,)}

__all__ = ["PATTERNS", "Match", "Pattern"]
