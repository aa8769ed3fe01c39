"""Benchmark models (presets from cohere_fx.configs, random weights) and their FLOP and byte counts.

Why random weights at real shapes: the Hub checkpoints are gated and tens of GB; the kernels, the memory
traffic and the FLOPs depend on the shapes only. ``--model PATH`` loads a local checkpoint instead.

The counts are computed from the config, not from the modules, so LoRA wrappers and nf4 packing do not change
them: what is counted is the model's own arithmetic (adapters, at r=16, add < 1 % and are left out).
"""
import tempfile
from dataclasses import dataclass

import torch

from cohere_fx.bench.timing import free_memory
from cohere_fx.configs import REAL, preset_config, tiny_cohere2_config, tiny_cohere_config

# "tiny" presets are for CPU smoke runs: a few layers, hidden 64, vocabulary 256.
TINY = {
    "tiny": lambda layers: tiny_cohere_config(layers=layers or 2, vocab_size=256),
    "tiny-cohere2": lambda layers: tiny_cohere2_config(layers=layers or 4, vocab_size=256),
}
PRESETS = sorted(REAL) + sorted(TINY)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config_for(preset: str, layers=None, path=None, attn: str = "sdpa"):
    if path:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        if layers:
            config.num_hidden_layers = layers
            if getattr(config, "layer_types", None) is not None:
                config.layer_types = config.layer_types[:layers]
    elif preset in TINY:
        config = TINY[preset](layers)
    else:
        config = preset_config(preset, layers)
    config._attn_implementation = attn
    return config


def build_model(config, device: torch.device, dtype: torch.dtype, path=None, seed: int = 0, nf4: bool = False):
    """The model on ``device`` in ``dtype``: random weights from ``config``, or the checkpoint at ``path``.

    nf4: QLoRA's base (bitsandbytes 4-bit NF4, double quantisation, compute in ``dtype``). bitsandbytes quantises
    while loading a checkpoint, so random weights are saved to a temporary directory and loaded back, as
    ../shared/anchors/bench_lora.py does.
    """
    from transformers import AutoModelForCausalLM

    if nf4:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"qlora needs bitsandbytes (pip install 'cohere_fx[qlora]'): {e}") from None
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                   bnb_4bit_use_double_quant=True)
        if path:
            return _load(path, config, device, dtype, quantization_config=quant)
        with tempfile.TemporaryDirectory() as tmp:
            base = build_model(config, device, dtype, seed=seed)
            base.save_pretrained(tmp)
            del base
            free_memory(device)  # the bf16 copy must be gone before the nf4 one loads
            return _load(tmp, config, device, dtype, quantization_config=quant)
    if path:
        return _load(path, config, device, dtype)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)


def _load(path, config, device, dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, device_map=device, **kwargs)


def weight_bytes(model) -> int:
    """Bytes of weights one forward pass reads: every parameter once, except an untied input embedding (a
    lookup reads a few rows of it, not the table)."""
    seen, total = set(), 0
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for p in model.parameters():
        if id(p) in seen or (p is embedding and p is not head):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


@dataclass
class Shape:
    """The dimensions that FLOP and byte counts need."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    windows: list  # per layer: the sliding window, or None for full attention

    @classmethod
    def of(cls, config) -> "Shape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        windows = [config.sliding_window if t == "sliding_attention" else None for t in types]
        return cls(config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.intermediate_size, config.vocab_size, windows)

    @property
    def layer_matmul_params(self) -> int:
        """q, k, v, o and gate, up, down of one decoder layer."""
        h, d = self.hidden, self.head_dim
        return h * d * (2 * self.heads + 2 * self.kv_heads) + 3 * h * self.ffn

    @property
    def matmul_params(self) -> int:
        """N in 2*N*T: every decoder layer's projections plus the LM head (embedding lookups do no FLOPs)."""
        return self.layers * self.layer_matmul_params + self.vocab * self.hidden

    def attention_flops(self, batch: int, q_len: int, past: int = 0) -> int:
        """Useful attention FLOPs of one forward: per layer and head 2*D per (query, key) pair for QK^T and as
        much for PV, over the pairs a causal (and, on sliding layers, windowed) mask allows. Kernels that
        compute masked-out pairs do more work than this; it is not counted."""
        return sum(4 * batch * self.heads * self.head_dim * attention_pairs(q_len, past, w) for w in self.windows)

    def forward_flops(self, batch: int, seq: int, logits_per_row: int = 0) -> int:
        """2*N*T + attention; the head counted for ``logits_per_row`` positions per row (0: all of them)."""
        head = self.vocab * self.hidden
        rows = logits_per_row or seq
        return (2 * (self.matmul_params - head) * batch * seq + 2 * head * batch * rows
                + self.attention_flops(batch, seq))

    def train_flops(self, batch: int, seq: int, full: bool) -> int:
        """Forward + backward. Matmuls: forward 2*N*T, input gradients 2*N*T, weight gradients 2*N*T only when
        the weights train (full: 6*N*T; LoRA/QLoRA, frozen base: 4*N*T). Attention: forward + 2x for backward."""
        matmul = 2 * self.matmul_params * batch * seq
        return (3 if full else 2) * matmul + 3 * self.attention_flops(batch, seq)

    def kv_bytes(self, batch: int, context: int, itemsize: int) -> int:
        """K and V bytes one decode step reads at ``context`` cached tokens (sliding layers: the window only)."""
        per_token = 2 * batch * self.kv_heads * self.head_dim * itemsize
        return sum(per_token * (min(context, w) if w else context) for w in self.windows)


def attention_pairs(q_len: int, past: int, window=None) -> int:
    """(query, key) pairs for queries at positions past .. past+q_len-1, each seeing min(pos + 1, window) keys."""
    def upto(n):  # sum over positions p < n of min(p + 1, window)
        if window is None or n <= window:
            return n * (n + 1) // 2
        return window * (window + 1) // 2 + (n - window) * window
    return upto(past + q_len) - upto(past)
