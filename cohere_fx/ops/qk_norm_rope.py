"""``cohere_fx::qk_norm_rope`` and ``cohere_fx::rope``: Cohere's QK-norm + interleaved RoPE + transpose as one op.

Why ops: the HF attention spells q_norm/k_norm, ``transpose(1, 2)`` and ``apply_rotary_pos_emb`` as ~30 nodes
with fp32 copies of q and k; one kernel reads q and k once (any view of the projection output) and writes them
once in the [B, heads, S, D] layout SDPA reads. ``rope`` is the same without the norm (Command R v01, Cohere2
sliding layers; Cohere2 global layers use no RoPE and are not rewritten).

Gradients: q, k (in their dtype) and, for ``qk_norm_rope``, both norm weights (summed in fp32 over B * S).
cos and sin get none: they come from the rotary module's ``inv_freq`` buffer under ``torch.no_grad``. The
backward recomputes the norm statistics from the saved q and k; the RoPE-only backward needs nothing but cos and
sin. Backward passes are ops of their own, so traced graphs stay opaque and readable.
"""
import torch
from torch import Tensor

from cohere_fx.kernels import runs_on_triton
from cohere_fx.ops.layer_norm import layer_norm_reference


def _on_triton(q: Tensor) -> bool:
    from cohere_fx.kernels.qk_norm_rope import kernel_supports

    return runs_on_triton(q) and kernel_supports(q.shape[-1])


def _check_dtypes(q: Tensor, k: Tensor) -> None:
    # HF casts both outputs to q's dtype; requiring one dtype keeps the RoPE-only backward free of q and k.
    if q.dtype != k.dtype:
        raise ValueError(f"qk_norm_rope: q and k dtypes differ ({q.dtype}, {k.dtype})")


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's apply_rotary_pos_emb on x [B, S, H, D] after transpose(1, 2): fp32 [B, H, S, D]."""
    t = x.transpose(1, 2).to(torch.float32)
    rotated = torch.stack([-t[..., 1::2], t[..., ::2]], dim=-1).flatten(-2)
    return t * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def _rotate_backward(g: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Transpose of _rotate: g [B, H, S, D] -> fp32 grad of x [B, S, H, D]."""
    g = g.to(torch.float32)
    gs = g * sin.unsqueeze(1)
    back = torch.stack([gs[..., 1::2], -gs[..., ::2]], dim=-1).flatten(-2)
    return (g * cos.unsqueeze(1) + back).transpose(1, 2)


def _norm_backward(dy: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(dx in fp32, dw summed over B and S in fp32) of CohereLayerNorm with a per-head weight [H, D]."""
    h = x.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    rstd = torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (h - mean) * rstd
    dy = dy.to(torch.float32)
    g = dy * weight.to(torch.float32)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx, (dy * xhat).sum((0, 1))


def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """transpose(1, 2) + apply_rotary_pos_emb, step for step; contiguous [B, heads, S, D] in q's dtype."""
    return (_rotate(q, cos, sin).to(q.dtype).contiguous(),
            _rotate(k, cos, sin).to(q.dtype).contiguous())


def qk_norm_rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_weight: Tensor, k_weight: Tensor,
                           eps: float) -> tuple[Tensor, Tensor]:
    """q_norm/k_norm (output rounded to the activation dtype, as HF does), then rope_reference."""
    return rope_reference(layer_norm_reference(q, q_weight, eps), layer_norm_reference(k, k_weight, eps), cos, sin)


def rope_backward_reference(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return (_rotate_backward(dq_out, cos, sin).to(dq_out.dtype).contiguous(),
            _rotate_backward(dk_out, cos, sin).to(dk_out.dtype).contiguous())


def qk_norm_rope_backward_reference(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                                   q_weight: Tensor, k_weight: Tensor, eps: float) -> tuple[Tensor, ...]:
    # The norm output is in the activation dtype, so the gradient reaching the norm is rounded to it too.
    dq, dqw = _norm_backward(_rotate_backward(dq_out, cos, sin).to(q.dtype), q, q_weight, eps)
    dk, dkw = _norm_backward(_rotate_backward(dk_out, cos, sin).to(k.dtype), k, k_weight, eps)
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dqw.to(q_weight.dtype),
            dkw.to(k_weight.dtype))


def _fake_outputs(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    b, s, h, d = q.shape
    return q.new_empty((b, h, s, d)), q.new_empty((b, k.shape[2], s, d))


@torch.library.custom_op("cohere_fx::qk_norm_rope", mutates_args=())
def qk_norm_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_weight: Tensor, k_weight: Tensor,
                 eps: float) -> tuple[Tensor, Tensor]:
    """q [B, S, H, D], k [B, S, Hk, D], cos/sin [1 or B, S, D], weights [H, D], [Hk, D] -> contiguous
    [B, H, S, D], [B, Hk, S, D] in q's dtype."""
    _check_dtypes(q, k)
    if _on_triton(q):
        from cohere_fx.kernels.qk_norm_rope import qk_norm_rope_fwd

        return qk_norm_rope_fwd(q, k, cos, sin, q_weight, k_weight, eps)
    return qk_norm_rope_reference(q, k, cos, sin, q_weight, k_weight, eps)


@qk_norm_rope.register_fake
def _(q, k, cos, sin, q_weight, k_weight, eps):
    _check_dtypes(q, k)
    return _fake_outputs(q, k)


@torch.library.custom_op("cohere_fx::rope", mutates_args=())
def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """qk_norm_rope without the norm."""
    _check_dtypes(q, k)
    if _on_triton(q):
        from cohere_fx.kernels.qk_norm_rope import rope_fwd

        return rope_fwd(q, k, cos, sin)
    return rope_reference(q, k, cos, sin)


@rope.register_fake
def _(q, k, cos, sin):
    _check_dtypes(q, k)
    return _fake_outputs(q, k)


@torch.library.custom_op("cohere_fx::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                          q_weight: Tensor, k_weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _on_triton(q):
        from cohere_fx.kernels.qk_norm_rope import qk_norm_rope_bwd

        return qk_norm_rope_bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, eps)
    return qk_norm_rope_backward_reference(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, eps)


@qk_norm_rope_backward.register_fake
def _(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, eps):
    dense = torch.contiguous_format
    return (q.new_empty(q.shape), k.new_empty(k.shape), torch.empty_like(q_weight, memory_format=dense),
            torch.empty_like(k_weight, memory_format=dense))


@torch.library.custom_op("cohere_fx::rope_backward", mutates_args=())
def rope_backward(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Grads of rope's q, k ([B, S, heads, D], contiguous) from its output grads ([B, heads, S, D])."""
    if _on_triton(dq_out):
        from cohere_fx.kernels.qk_norm_rope import rope_bwd

        return rope_bwd(dq_out, dk_out, cos, sin)
    return rope_backward_reference(dq_out, dk_out, cos, sin)


@rope_backward.register_fake
def _(dq_out, dk_out, cos, sin):
    return dq_out.new_empty(dq_out.transpose(1, 2).shape), dk_out.new_empty(dk_out.transpose(1, 2).shape)


def _setup_qk_norm_rope(ctx, inputs, output):
    q, k, cos, sin, q_weight, k_weight, eps = inputs
    ctx.save_for_backward(q, k, cos, sin, q_weight, k_weight)
    ctx.eps = eps


def _backward_qk_norm_rope(ctx, dq_out, dk_out):
    q, k, cos, sin, q_weight, k_weight = ctx.saved_tensors
    dq, dk, dqw, dkw = qk_norm_rope_backward(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, ctx.eps)
    return dq, dk, None, None, dqw, dkw, None


def _setup_rope(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _backward_rope(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = rope_backward(dq_out, dk_out, cos, sin)
    return dq, dk, None, None


qk_norm_rope.register_autograd(_backward_qk_norm_rope, setup_context=_setup_qk_norm_rope)
rope.register_autograd(_backward_rope, setup_context=_setup_rope)
