"""``cohere_fx::decode_linear``: ``[F.linear(x, w) for w in weights]`` for a decode step's few rows, one launch.

Why an op: at decode the linear layers stream their weights and nothing else; the Triton kernel
(kernels/decode_linear.py) reads q, k, v, gate and up (which all read one LayerNorm output in Cohere's parallel
block) in one launch without cuBLAS's split-K reduction passes, and streams the 256 000-row head faster than
cuBLAS does (benchmarks/sweep_decode_linear.py). Inference only: no autograd formula; the pattern applies it only
where the graph computes no gradient.

Rounding: each output is an fp32 dot product over K rounded once to x's dtype, as cuBLAS computes it; only the
order of the fp32 accumulation differs.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from cohere_fx.kernels import runs_on_triton
from cohere_fx.kernels.decode_linear import MAX_ROWS, MAX_WEIGHTS


def fits_kernel(x: Tensor, weights: list[Tensor]) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (runs_on_triton(x) and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and 0 < rows <= MAX_ROWS
            and len(weights) <= MAX_WEIGHTS and all(w.is_contiguous() and w.dtype == x.dtype for w in weights))


@torch.library.custom_op("cohere_fx::decode_linear", mutates_args=())
def decode_linear(x: Tensor, weights: list[Tensor]) -> list[Tensor]:
    """x [..., K]; weights [N_i, K] -> [x @ w.T] of shapes [..., N_i] in x's dtype."""
    if not weights or any(w.dim() != 2 or w.shape[1] != x.shape[-1] for w in weights):
        raise ValueError(f"decode_linear: weights [N, {x.shape[-1]}] expected, got "
                         f"{[tuple(w.shape) for w in weights]}")
    if not fits_kernel(x, weights):
        return [F.linear(x, w) for w in weights]
    from cohere_fx.kernels.decode_linear import decode_linear_fwd

    outs = decode_linear_fwd(x.reshape(-1, x.shape[-1]).contiguous(), weights)
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]


@decode_linear.register_fake
def _(x, weights):
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]
