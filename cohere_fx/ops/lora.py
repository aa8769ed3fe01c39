"""``cohere_fx::lora_shrink`` and ``cohere_fx::lora_expand``: PEFT LoRA's fp32 adapter path over a bf16/fp16 base
layer, as two ops whose kernels never make an fp32 copy of an activation or gradient (kernels/lora.py says why).

``lora_shrink(x, A)`` is PEFT's ``lora_A(x.to(A.dtype))``: ``x.to(fp32) @ A.T``. Autograd saves x in its own
dtype (the fp32 copy it replaces was exact, so nothing is lost) and A; the backward gives x's gradient rounded
to x's dtype, as differentiating PEFT's cast does, and A's in fp32.

``lora_expand(base, h, B, scaling, round_update)`` is the rest of the layer: ``(base + lora_B(h) * scaling)
.to(base.dtype)`` (PEFT's Linear), or with ``round_update`` ``base + (lora_B(h) * scaling).to(base.dtype)``
(PEFT's bitsandbytes Linear4bit). Its gradient for the base is the output gradient itself; for h and B it is
computed from ``dy.float() * scaling``. Autograd saves h (``[tokens, rank]``) and B.

CPU (and any device Triton cannot run on): the same math in torch. Backward passes are ops of their own, so
traced graphs stay opaque and readable.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from cohere_fx.kernels import runs_on_triton
from cohere_fx.kernels.lora import MAX_RANK

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _rows(t: Tensor) -> Tensor:
    """[..., C] -> [rows, C] with a unit last stride (a view where possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _on_triton(activation: Tensor, weight: Tensor) -> bool:
    return (runs_on_triton(activation) and activation.dtype in LOW_PRECISION and weight.dtype == torch.float32
            and weight.is_contiguous())


def _check_shrink(x: Tensor, a: Tensor) -> None:
    if a.dim() != 2 or a.shape[1] != x.shape[-1] or not 1 <= a.shape[0] <= MAX_RANK:
        raise ValueError(f"lora_shrink: A [rank <= {MAX_RANK}, {x.shape[-1]}] expected, got {tuple(a.shape)}")
    if x.dtype not in LOW_PRECISION or a.dtype != torch.float32:
        raise ValueError(f"lora_shrink: x bf16/fp16 and A fp32 expected, got {x.dtype} and {a.dtype}")


def _check_expand(base: Tensor, h: Tensor, b: Tensor) -> None:
    if (b.dim() != 2 or b.shape[0] != base.shape[-1] or h.shape[-1] != b.shape[1] or h.shape[:-1] != base.shape[:-1]
            or not 1 <= b.shape[1] <= MAX_RANK):
        raise ValueError(f"lora_expand: base [..., N], h [..., rank], B [N, rank <= {MAX_RANK}] expected, got base "
                         f"{tuple(base.shape)}, h {tuple(h.shape)}, B {tuple(b.shape)}")
    if base.dtype not in LOW_PRECISION or h.dtype != torch.float32 or b.dtype != torch.float32:
        raise ValueError(f"lora_expand: base bf16/fp16, h and B fp32 expected, got {base.dtype}, {h.dtype}, "
                         f"{b.dtype}")


@torch.library.custom_op("cohere_fx::lora_shrink", mutates_args=())
def lora_shrink(x: Tensor, a: Tensor) -> Tensor:
    """x [..., K] bf16/fp16, A [rank, K] fp32 -> x.to(fp32) @ A.T, fp32 [..., rank]."""
    _check_shrink(x, a)
    if not _on_triton(x, a):
        return F.linear(x.to(a.dtype), a)
    from cohere_fx.kernels.lora import lora_shrink_fwd

    return lora_shrink_fwd(_rows(x), a).view(*x.shape[:-1], a.shape[0])


@lora_shrink.register_fake
def _(x, a):
    _check_shrink(x, a)
    return x.new_empty((*x.shape[:-1], a.shape[0]), dtype=a.dtype)


@torch.library.custom_op("cohere_fx::lora_shrink_backward", mutates_args=())
def lora_shrink_backward(dh: Tensor, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(dx in x's dtype, dA fp32) of lora_shrink."""
    if not _on_triton(x, a):
        d = dh.to(a.dtype)
        return (d @ a).to(x.dtype), _rows(d).t() @ _rows(x).to(a.dtype)
    from cohere_fx.kernels.lora import lora_shrink_bwd

    dx, da = lora_shrink_bwd(_rows(dh).contiguous(), _rows(x), a)
    return dx.view(x.shape), da


@lora_shrink_backward.register_fake
def _(dh, x, a):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(a)


def _setup_shrink(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_shrink(ctx, dh):
    x, a = ctx.saved_tensors
    dx, da = lora_shrink_backward(dh, x, a)
    return dx, da


lora_shrink.register_autograd(_backward_shrink, setup_context=_setup_shrink)


def lora_expand_reference(base: Tensor, h: Tensor, b: Tensor, scaling: float, round_update: bool) -> Tensor:
    update = F.linear(h, b) * scaling
    if round_update:
        return base + update.to(base.dtype)
    return (base + update).to(base.dtype)


@torch.library.custom_op("cohere_fx::lora_expand", mutates_args=())
def lora_expand(base: Tensor, h: Tensor, b: Tensor, scaling: float, round_update: bool) -> Tensor:
    """base [..., N] bf16/fp16, h [..., rank] fp32, B [N, rank] fp32 -> base + (h @ B.T) * scaling, PEFT's way."""
    _check_expand(base, h, b)
    if not _on_triton(base, b):
        return lora_expand_reference(base, h, b, scaling, round_update)
    from cohere_fx.kernels.lora import lora_expand_fwd

    return lora_expand_fwd(_rows(base), _rows(h), b, scaling, round_update).view(base.shape)


@lora_expand.register_fake
def _(base, h, b, scaling, round_update):
    _check_expand(base, h, b)
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@torch.library.custom_op("cohere_fx::lora_expand_backward", mutates_args=())
def lora_expand_backward(dy: Tensor, h: Tensor, b: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """(dh, dB), both fp32, of lora_expand from its output gradient dy."""
    if not _on_triton(dy, b):
        g = dy.to(torch.float32) * scaling
        return g @ b, _rows(g).t() @ _rows(h)
    from cohere_fx.kernels.lora import lora_expand_bwd

    dh, db = lora_expand_bwd(_rows(dy), _rows(h), b, scaling)
    return dh.view(h.shape), db


@lora_expand_backward.register_fake
def _(dy, h, b, scaling):
    return torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(b)


def _setup_expand(ctx, inputs, output):
    _, h, b, scaling, _ = inputs
    ctx.save_for_backward(h, b)
    ctx.scaling = scaling


def _backward_expand(ctx, dy):
    h, b = ctx.saved_tensors
    dh, db = lora_expand_backward(dy, h, b, ctx.scaling)
    return dy, dh, db, None, None


lora_expand.register_autograd(_backward_expand, setup_context=_setup_expand)
