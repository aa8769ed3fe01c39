"""Cross-entropy over logit-scaled rows in Triton: forward (loss + logsumexp) and backward (dlogits), and the
in-place scale of the gradients that linear cross-entropy computes in its forward.

Cohere's head computes ``logits * logit_scale`` in the activation dtype and the HF loss upcasts that to fp32:
with a 256 000-word vocabulary, the scaled copy, its fp32 upcast and the fp32 softmax gradient cost several
GB per step. Here each program owns one row and walks it in BLOCK_V-wide blocks with an online max/sum, so
nothing row-sized is ever held: the forward reads the unscaled logits once and writes two floats per row; the
backward reads them once more and writes dlogits once (in place, if asked to), adding the logits' own incoming
gradient where there is one, so that sum costs no second pass. Both kernels reproduce HF's rounding of the
scaled logits to the logits' dtype before the fp32 upcast, so bf16 losses match HF's.
"""

import torch
import triton
import triton.language as tl

from cohere_fx.kernels import cdiv, next_power_of_2, on_device

MAX_BLOCK_V = 4096


@triton.jit
def _scaled(x, scale):
    """HF's ``(logits * scale).float()``: the fp32 product rounded to the logits' dtype, then upcast."""
    y = x.to(tl.float32) * scale
    if x.dtype == tl.bfloat16:
        # Round to nearest even on the bits: Triton's interpreter truncates fp32 -> bf16 casts, and this way the
        # CPU tests check the very numbers the GPU computes (a few integer ops on a memory-bound kernel).
        b = y.to(tl.uint32, bitcast=True)
        y = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16).to(tl.float32, bitcast=True)
    elif x.dtype == tl.float16:
        y = y.to(tl.float16).to(tl.float32)
    return y


# V is a constexpr (one compile per vocabulary size): Triton's interpreter cannot ``range`` over a runtime int
# argument under numpy 2, and a known trip count costs nothing on the GPU.
@triton.jit
def _ce_fwd_kernel(LOGITS, LABELS, LOSS, LSE, stride_row, scale, ignore_index, V: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.where(mask, _scaled(tl.load(base + cols, mask=mask, other=0.0), scale), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    z_label = _scaled(tl.load(base + tl.where(valid, label, 0)), scale)
    tl.store(LSE + row, lse)
    tl.store(LOSS + row, tl.where(valid, lse - z_label, 0.0))


@triton.jit
def _ce_bwd_kernel(DLOGITS, LOGITS, LABELS, LSE, DLOSS, DIN, stride_row, stride_drow, stride_dloss,
                   stride_din_row, stride_din_col, scale, ignore_index, V: tl.constexpr, BLOCK_V: tl.constexpr,
                   HAS_DIN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row)
    lse = tl.load(LSE + row)
    coef = tl.where(label != ignore_index, tl.load(DLOSS + row * stride_dloss).to(tl.float32) * scale, 0.0)
    base = LOGITS + row * stride_row
    dbase = DLOGITS + row * stride_drow
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        p = tl.exp(_scaled(tl.load(base + cols, mask=mask, other=0.0), scale) - lse)
        g = coef * (p - tl.where(cols == label, 1.0, 0.0))
        if HAS_DIN:
            g += tl.load(DIN + row * stride_din_row + cols * stride_din_col, mask=mask, other=0.0).to(tl.float32)
        tl.store(dbase + cols, g.to(DLOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(X, SCALE, numel, BLOCK: tl.constexpr):
    s = tl.load(SCALE)
    if s == 1.0:
        return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask)
    tl.store(X + offs, (x.to(tl.float32) * s).to(X.dtype.element_ty), mask=mask)


def _launch_config(v: int, block_v: int | None) -> tuple[int, int]:
    block_v = block_v or min(next_power_of_2(v), MAX_BLOCK_V)
    return block_v, max(1, min(16, block_v // 512))


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"cross_entropy: logits must be [N, V] with unit column stride, got "
                         f"shape {tuple(logits.shape)} strides {logits.stride()}")
    if labels.shape != logits.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"cross_entropy: labels must be int64 [{logits.shape[0]}], got "
                         f"{labels.dtype} {tuple(labels.shape)}")


def cross_entropy_fwd(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int,
                      block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse), both fp32 [N]: lse = logsumexp(z), loss = lse - z[label] (0 where label == ignore_index),
    z = (logits * scale) rounded to logits' dtype. Labels outside [0, V) other than ignore_index are not checked.
    """
    _check(logits, labels)
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        block_v, num_warps = _launch_config(v, block_v)
        with on_device(logits):
            _ce_fwd_kernel[(n,)](logits, labels.contiguous(), loss, lse, logits.stride(0), float(scale),
                                 int(ignore_index), V=v, BLOCK_V=block_v, num_warps=num_warps)
    return loss, lse


def cross_entropy_bwd(dloss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                      scale: float, ignore_index: int, out: torch.Tensor | None = None,
                      dlogits_in: torch.Tensor | None = None, block_v: int | None = None) -> torch.Tensor:
    """dlogits = dloss[row] * scale * (softmax(z) - onehot(label)) + dlogits_in, the first term 0 on ignored rows,
    summed in fp32 and rounded once to logits' dtype.

    ``dlogits_in`` (optional, [N, V], any strides and float dtype) is a gradient the logits receive from elsewhere:
    adding it here spares a read and a write of the whole gradient. ``dloss`` may have any stride (an expanded
    scalar has stride 0). ``out`` may be ``logits`` itself: each element is read before it is overwritten by the
    same program, so the gradient can replace the logits.
    """
    _check(logits, labels)
    n, v = logits.shape
    out = torch.empty_like(logits, memory_format=torch.contiguous_format) if out is None else out
    if dloss.shape != (n,):
        raise ValueError(f"cross_entropy: dloss must be [{n}], got {tuple(dloss.shape)}")
    if out.shape != logits.shape or out.stride(1) != 1 or out.dtype != logits.dtype:
        raise ValueError("cross_entropy: out must match logits' shape and dtype with unit column stride")
    if dlogits_in is not None and dlogits_in.shape != logits.shape:
        raise ValueError(f"cross_entropy: dlogits_in must be {tuple(logits.shape)}, got {tuple(dlogits_in.shape)}")
    din, din_strides = (logits, (0, 0)) if dlogits_in is None else (dlogits_in, dlogits_in.stride())
    if n:
        block_v, num_warps = _launch_config(v, block_v)
        with on_device(logits):
            _ce_bwd_kernel[(n,)](out, logits, labels.contiguous(), lse.contiguous(), dloss, din, logits.stride(0),
                                 out.stride(0), dloss.stride(0), *din_strides, float(scale), int(ignore_index),
                                 V=v, BLOCK_V=block_v, HAS_DIN=dlogits_in is not None, num_warps=num_warps)
    return out


def scale_(x: torch.Tensor, scale: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """``x *= scale`` in place: x in fp32 times the fp32 scale, rounded once to x's dtype (what ``x.mul_(scale)``
    computes on CPU). When scale == 1 every program returns after reading it, so x is neither read nor written;
    the comparison runs on the device, so the caller never synchronises with the host. x contiguous; scale one
    element on x's device.
    """
    if not x.is_contiguous() or scale.numel() != 1 or scale.device != x.device:
        raise ValueError(f"scale_: x must be contiguous and scale one element on its device, got strides "
                         f"{x.stride()} and a {tuple(scale.shape)} scale on {scale.device}")
    if x.numel():
        with on_device(x):
            _scale_kernel[(cdiv(x.numel(), block),)](x, scale.to(torch.float32), x.numel(), BLOCK=block,
                                                      num_warps=8)
    return x
