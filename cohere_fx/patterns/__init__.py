"""The registry of fusions, in the order the pipeline applies them. One file per fusion."""
from cohere_fx.patterns import causal_attention
from cohere_fx.patterns import decode_linear
from cohere_fx.patterns import decode_residual
from cohere_fx.patterns import embedding
from cohere_fx.patterns import layer_norm
from cohere_fx.patterns import linear_cross_entropy
from cohere_fx.patterns import lora_expand
from cohere_fx.patterns import lora_shared_input
from cohere_fx.patterns import lora_shrink
from cohere_fx.patterns import paged_attention
from cohere_fx.patterns import parallel_residual
from cohere_fx.patterns import qk_norm_rope
from cohere_fx.patterns import rope
from cohere_fx.patterns import rope_kv_write
from cohere_fx.patterns import scaled_cross_entropy
from cohere_fx.patterns import sliding_attention
from cohere_fx.patterns import swiglu
from cohere_fx.patterns import swiglu_lora_shrink
from cohere_fx.patterns.base import Match, Pattern

PATTERNS: dict[str, Pattern] = {p.name: p for p in (
    qk_norm_rope.PATTERN,
    rope.PATTERN,
    paged_attention.PATTERN,  # before causal_attention: decode SDPA over a paged cache
    rope_kv_write.PATTERN,  # decode steps: reads the qk_norm_rope/rope ops and the paged cache's writes
    causal_attention.PATTERN,
    sliding_attention.PATTERN,
    embedding.PATTERN,
    layer_norm.PATTERN,
    swiglu.PATTERN,
    parallel_residual.PATTERN,
    linear_cross_entropy.PATTERN,  # only with options={"return_logits": False}
    scaled_cross_entropy.PATTERN,
    lora_shared_input.PATTERN,
    lora_shrink.PATTERN,  # after lora_shared_input: also takes its one GEMM over the A matrices
    lora_expand.PATTERN,
    swiglu_lora_shrink.PATTERN,  # reads the swiglu and lora_shrink ops
    decode_linear.PATTERN,  # decode steps only (no gradient, <= 16 rows): after the fusions that read linears
    decode_residual.PATTERN,  # reads decode_linear's o and down calls and parallel_residual
)}

__all__ = ["PATTERNS", "Match", "Pattern"]
