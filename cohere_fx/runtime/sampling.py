"""How a request picks its next token: ``SamplingParams`` and the batched sampler the engine calls every step.

Why the randomness lives in one CPU ``torch.Generator`` per request: a request's tokens must depend on its
prompt and seed only, not on which other requests share its batch, nor on the device. So each request draws
one uniform number per token from its own generator (on the CPU: the same stream on every device), and that
number picks a token by inverse CDF over the request's own (temperature-scaled, top-p-truncated) distribution.
Everything else is batched: one softmax, sort and cumulative sum for all sampled rows of a step, and one
argmax for the greedy ones.
"""
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cohere_fx.runtime.paged_cache import to_device


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes.

    max_new_tokens: tokens to generate at most (finish reason "length").
    temperature: 0 = greedy (argmax, as HF ``do_sample=False``); above 0 the logits are divided by it and sampled.
    top_p: nucleus sampling, keep the most likely tokens whose probabilities add up to ``top_p`` (at least one).
    seed: seeds the request's own generator; equal seeds give equal tokens whatever else is batched. None: a
        seed drawn from torch's global generator when the request is added.
    stop_token_ids: generation ends after any of these tokens (included in the output, finish reason "stop").
        None: the engine's default (the model's eos tokens); () never stops early.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        if self.stop_token_ids is not None:
            stops = tuple(self.stop_token_ids)
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stops):
                raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", stops)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_tokens(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Tensor:
    """One token per row of ``logits`` [B, V] (fp32), row i decoded with ``params[i]`` and ``generators[i]``:
    int64 [B] on the logits' device, not read back (the engine reads a step's tokens while the next one runs)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        index = to_device(rows, logits.device)
        tokens[index] = _sample_rows(logits[index], [params[i] for i in rows], [generators[i] for i in rows])
    return tokens


def _sample_rows(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Tensor:
    """Inverse-CDF sampling over each row's top-p nucleus, with one uniform draw per row from its generator."""
    device = logits.device
    temperature = to_device([p.temperature for p in params], device, torch.float32)
    top_p = to_device([p.top_p for p in params], device, torch.float32)
    uniform = to_device(torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]), device,
                        torch.float64)
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
    # top_p = 1 keeps everything, even where fp32 rounding lets the mass before the tail reach 1
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1)
    keep[:, 0] = True  # the most likely token always stays
    cdf = torch.where(keep, sorted_probs, 0.0).double().cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)
    last_kept = keep.sum(dim=-1, keepdim=True) - 1  # the kept tokens are a prefix of the sorted order
    return order.gather(-1, torch.minimum(pick, last_kept)).squeeze(-1)
