"""``cohere_fx::nf4_dequantize``: a bitsandbytes NF4 weight with double quantisation, dequantised in one launch
(kernels/nf4.py says why and how).

Its inputs are the QuantState's tensors as bitsandbytes' own ops receive them in a traced graph: the packed codes,
the 8-bit block scales (``absmax``), their code table (``state2.code``), the fp32 scales of those
(``state2.absmax``) and ``offset``. The weights are frozen, so the op has no gradient.

CPU (and any device Triton cannot run on): the same math in torch.
"""
import torch
from torch import Tensor

from cohere_fx.kernels import runs_on_triton
from cohere_fx.kernels.nf4 import NF4, SCALE_BLOCK


def nf4_dequantize_reference(q: Tensor, absmax_q: Tensor, code8: Tensor, absmax_scale: Tensor, offset: Tensor,
                             blocksize: int, shape: list[int], dtype: torch.dtype) -> Tensor:
    n = torch.Size(shape).numel()
    scale = code8[absmax_q.long()] * absmax_scale.repeat_interleave(SCALE_BLOCK)[:absmax_q.numel()]
    scale = scale + offset
    packed = q.reshape(-1)
    codes = torch.stack((packed >> 4, packed & 0xF), -1).reshape(-1)[:n].long()
    table = torch.tensor(NF4, dtype=torch.float32, device=q.device)
    return (table[codes] * scale.repeat_interleave(blocksize)[:n]).to(dtype).view(shape)


def _check(q: Tensor, absmax_q: Tensor, code8: Tensor, absmax_scale: Tensor, offset: Tensor, blocksize: int,
           shape: list[int], dtype: torch.dtype) -> None:
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"nf4_dequantize: blocksize {blocksize} is not a power of two")
    n = torch.Size(shape).numel()
    blocks = -(-n // blocksize)
    if q.dtype != torch.uint8 or q.numel() * 2 < n:
        raise ValueError(f"nf4_dequantize: {-(-n // 2)} packed uint8 codes expected, got {q.numel()} {q.dtype}")
    if absmax_q.dtype != torch.uint8 or absmax_q.numel() != blocks:
        raise ValueError(f"nf4_dequantize: {blocks} uint8 block scales expected, got {absmax_q.numel()} "
                         f"{absmax_q.dtype}")
    if code8.dtype != torch.float32 or code8.numel() != 256:
        raise ValueError(f"nf4_dequantize: an fp32 [256] scale code table expected, got {tuple(code8.shape)} "
                         f"{code8.dtype}")
    if absmax_scale.dtype != torch.float32 or absmax_scale.numel() != -(-blocks // SCALE_BLOCK):
        raise ValueError(f"nf4_dequantize: {-(-blocks // SCALE_BLOCK)} fp32 second-level scales expected, got "
                         f"{absmax_scale.numel()} {absmax_scale.dtype}")
    if offset.dtype != torch.float32 or offset.numel() != 1:
        raise ValueError(f"nf4_dequantize: an fp32 scalar offset expected, got {tuple(offset.shape)} {offset.dtype}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"nf4_dequantize: output dtype {dtype} is not bf16, fp16 or fp32")


@torch.library.custom_op("cohere_fx::nf4_dequantize", mutates_args=())
def nf4_dequantize(q: Tensor, absmax_q: Tensor, code8: Tensor, absmax_scale: Tensor, offset: Tensor, blocksize: int,
                   shape: list[int], dtype: torch.dtype) -> Tensor:
    """The weight [shape] in ``dtype``: NF4[code] * (code8[absmax_q] * absmax_scale + offset), per block."""
    _check(q, absmax_q, code8, absmax_scale, offset, blocksize, shape, dtype)
    if not runs_on_triton(q):
        return nf4_dequantize_reference(q, absmax_q, code8, absmax_scale, offset, blocksize, shape, dtype)
    from cohere_fx.kernels.nf4 import nf4_dequantize as launch

    return launch(q, absmax_q, code8, absmax_scale, offset, blocksize, shape, dtype)


@nf4_dequantize.register_fake
def _(q, absmax_q, code8, absmax_scale, offset, blocksize, shape, dtype):
    return q.new_empty(shape, dtype=dtype)
