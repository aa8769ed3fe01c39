"""``nf4_dequantize``: bitsandbytes' dequantisation of an NF4 weight with double quantisation (QLoRA's base layers)
-> one cohere_fx.nf4_dequantize.

Why: each 4-bit linear dequantises its weight in MatMul4Bit's forward (inside ``bitsandbytes::gemm_4bit``, which
for many rows dequantises and calls ``linear``) and again in its backward, each time in three launches issued from
Python; the op is one launch (kernels/nf4.py, with the H100 figures).

Two spellings, as bitsandbytes 0.50 writes them (``autograd/_functions.py``, ``backends/cuda/ops.py``):
- the forward: ``gemm_4bit(x, B, shape, state2.absmax, blocksize, quant_type, bias=None, absmax_8bit=absmax,
  absmax_code=state2.code, absmax_offset=offset)`` -> ``linear(x, nf4_dequantize(...))``. Only where x has more
  rows than ``GEMM_4BIT_CUSTOM_MAX_ROWS``: below that, bitsandbytes' CUDA op may use its own 4-bit GEMM instead of
  dequantising, and that is left alone.
- the backward (``functional.dequantize_4bit`` of a nested state): ``dequantize_blockwise(absmax, state2.absmax,
  state2.code.to(device), 256, float32)``, ``+= offset``, ``dequantize_4bit(B, scale, blocksize, "nf4", shape,
  dtype)`` -> ``nf4_dequantize(...)``.
The pattern has no variants until bitsandbytes has registered its ops (nothing to match before that).
"""
import operator
from dataclasses import dataclass

import torch

from cohere_fx.kernels.nf4 import SCALE_BLOCK
from cohere_fx.patterns.base import Match, Pattern, fake_value

GEMM_4BIT_CUSTOM_MAX_ROWS = 1536  # bitsandbytes 0.50's _gemm_4bit_custom_max_m on CUDA
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit block sizes


def _bnb(name: str):
    return getattr(torch.ops.bitsandbytes, name).default


def search_forward(x, q, shape, absmax_scale, blocksize, quant_type, absmax_q, code8, offset):
    return _bnb("gemm_4bit")(x, q, shape, absmax_scale, blocksize, quant_type, bias=None, absmax_8bit=absmax_q,
                             absmax_code=code8, absmax_offset=offset)


def search_backward(q, absmax_q, absmax_scale, code8, device, offset, blocksize, shape, dtype):
    scale = _bnb("dequantize_blockwise")(absmax_q, absmax_scale, code8.to(device), SCALE_BLOCK, torch.float32)
    # bitsandbytes' `absmax += offset`, which Dynamo records as operator.iadd: an fx proxy has no in-place add (`+=`
    # would trace as add), so the node is made directly
    scale = scale.tracer.create_proxy("call_function", operator.iadd, (scale, offset), {})
    return _bnb("dequantize_4bit")(q, scale, blocksize, "nf4", shape, dtype)


def _is_forward(match: Match) -> bool:
    return "x" in match.bindings


def check(match: Match):
    q, absmax_q, code8 = match.val("q"), match.val("absmax_q"), match.val("code8")
    absmax_scale, offset = match.val("absmax_scale"), match.val("offset")
    if any(v is None for v in (q, absmax_q, code8, absmax_scale, offset)):
        return "no traced shapes"
    if _is_forward(match) and match["quant_type"] != "nf4":
        return f"quant_type {match['quant_type']!r}, not nf4"
    if match["blocksize"] not in BLOCKSIZES:
        return f"blocksize {match['blocksize']}"
    shape = match["shape"]
    if len(shape) != 2 or not all(isinstance(s, int) for s in shape):
        return f"weight shape {shape} is not 2-D and static"
    if q.dtype != torch.uint8 or absmax_q.dtype != torch.uint8:
        return f"codes stored as {q.dtype} / {absmax_q.dtype}, not uint8"
    if code8.dtype != torch.float32 or absmax_scale.dtype != torch.float32 or offset.dtype != torch.float32:
        return "scales are not fp32"
    if len({t.device for t in (q, absmax_q, code8, absmax_scale, offset)}) != 1:
        return "state tensors on several devices"
    if _is_forward(match):
        x = match.val("x")
        rows = x.numel() // x.shape[-1] if x is not None else None
        if not isinstance(rows, int) or rows <= GEMM_4BIT_CUSTOM_MAX_ROWS:
            return f"{rows} rows: bitsandbytes may use its own 4-bit GEMM there"
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return f"input {x.dtype}"
    elif match["dtype"] not in (torch.bfloat16, torch.float16, torch.float32):
        return f"output dtype {match['dtype']}"
    return None


def replace(match: Match):
    dtype = match.val("x").dtype if _is_forward(match) else match["dtype"]
    weight = match.call(torch.ops.cohere_fx.nf4_dequantize.default, match["q"], match["absmax_q"], match["code8"],
                        match["absmax_scale"], match["offset"], match["blocksize"], list(match["shape"]), dtype)
    weight.meta["example_value"] = fake_value(match.bindings["q"]).new_empty(match["shape"], dtype=dtype)
    if not _is_forward(match):
        return weight
    return match.graph.create_node("call_function", torch.nn.functional.linear, (match["x"], weight, None),
                                   name=f"{match.pattern.name}_linear")


@dataclass(frozen=True)
class _BitsandbytesPattern(Pattern):
    @property
    def variants(self) -> list[torch.fx.Graph]:
        return super().variants if hasattr(torch.ops.bitsandbytes, "dequantize_4bit") else []


PATTERN = _BitsandbytesPattern("nf4_dequantize", (search_forward, search_backward), replace, check,
                               literals=("shape", "blocksize", "quant_type", "device", "dtype"))
