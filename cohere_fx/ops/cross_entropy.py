"""Cohere's logit-scaled head and cross-entropy as ops: per-token loss from logits, the head and loss with a
chunked backward (logits returned), and fused linear cross-entropy (logits never built).

HF computes ``logits = lm_head(h) * logit_scale`` in the activation dtype, upcasts to fp32 and runs
``F.cross_entropy``; at a 256 000-word vocabulary the scaled copy, the fp32 copy and the fp32 gradient cost
several GB. ``scaled_cross_entropy`` takes the unscaled logits and never builds a row-sized temporary; it
returns the per-row logsumexp as a second, non-differentiable output so the backward reads the logits once.

``linear_cross_entropy`` goes further and never builds the [N, V] logits: rows are processed in chunks whose
logits fit ``CHUNK_BYTES``; each chunk's gradient replaces its logits in place and is folded straight into
the hidden and weight gradients, which are therefore computed during the forward and only scaled by the
incoming scalar gradient in the backward. With a ``divisor`` (HF's 'mean': the count of non-ignored labels)
the op returns ``sum / divisor`` and its forward computes the gradients of that quotient, so the backward of
an unscaled loss (gradient 1) has nothing to scale (eager skips the scale on the device; see ``_scale_grad``).
Whether the gradients are computed is decided where it can be known: the public op is CompositeImplicitAutograd,
so it runs at the autograd layer (eager, or aot_autograd's joint trace), reads ``requires_grad`` of hidden and
weight there and passes two flags to the forward op. A frozen head (LoRA) therefore costs no weight-gradient GEMM
and no [V, H] buffer.

Memory of ``linear_cross_entropy`` beyond its inputs: one chunk of logits (<= CHUNK_BYTES, twice that with a
weight gradient, at least one row),
fp32 [N] loss and lse, and, when needed, grad_hidden [N, H] in hidden's dtype and grad_weight [V, H] in
weight's dtype, both held from forward to backward, where they are scaled in place by the loss gradient.
grad_weight is accumulated in weight's dtype: every chunk's GEMM accumulates in fp32 and rounds once when it
adds into the buffer, so a bf16 weight gets one bf16 rounding per chunk instead of a 4-byte [V, H]
accumulator (4 GB at 256 000 x 4096).
"""
from typing import Optional

import torch
from torch import Tensor

from cohere_fx.kernels import runs_on_triton

# Logits bytes per chunk of linear_cross_entropy: 512 MiB is 1024 rows of a 256 000-word bf16 vocabulary,
# enough rows for the head GEMMs to run at full rate.
CHUNK_BYTES = 512 << 20


def scaled_cross_entropy_reference(logits: Tensor, labels: Tensor, scale: float,
                                   ignore_index: int) -> tuple[Tensor, Tensor]:
    """(loss, lse) in fp32 with HF's rounding: ``z = (logits * scale).float()``, loss 0 on ignored rows."""
    z = (logits * scale).float()
    lse = z.logsumexp(-1)
    valid = labels != ignore_index
    z_label = z.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return torch.where(valid, lse - z_label, 0.0), lse


def scaled_cross_entropy_backward_reference(dloss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                                            scale: float, ignore_index: int,
                                            dlogits_in: Optional[Tensor] = None) -> Tensor:
    """dlogits = dloss * scale * (softmax(z) - onehot(label)) + dlogits_in, the first term 0 on ignored rows,
    summed in fp32 and rounded once to logits' dtype (what the Triton kernel computes)."""
    valid = labels != ignore_index
    g = torch.exp((logits * scale).float() - lse[:, None])
    g[torch.arange(len(labels), device=labels.device), torch.where(valid, labels, 0)] -= 1.0
    g *= torch.where(valid, dloss.float() * scale, 0.0)[:, None]
    if dlogits_in is not None:
        g += dlogits_in.float()
    return g.to(logits.dtype)


def _ce_forward(logits, labels, scale, ignore_index):
    if runs_on_triton(logits):
        from cohere_fx.kernels.cross_entropy import cross_entropy_fwd

        return cross_entropy_fwd(logits, labels, scale, ignore_index)
    return scaled_cross_entropy_reference(logits, labels, scale, ignore_index)


def _ce_backward(dloss, logits, labels, lse, scale, ignore_index, out, dlogits_in=None):
    if runs_on_triton(logits):
        from cohere_fx.kernels.cross_entropy import cross_entropy_bwd

        return cross_entropy_bwd(dloss, logits, labels, lse, scale, ignore_index, out=out, dlogits_in=dlogits_in)
    return out.copy_(scaled_cross_entropy_backward_reference(dloss, logits, labels, lse, scale, ignore_index,
                                                             dlogits_in))


@torch.library.custom_op("cohere_fx::scaled_cross_entropy", mutates_args=())
def scaled_cross_entropy(logits: Tensor, labels: Tensor, scale: float,
                         ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """(loss, lse), fp32 [N]: the per-token loss of ``cross_entropy((logits * scale).float(), labels)`` and
    the row logsumexp (the latter not differentiable). logits [N, V] unscaled, unit column stride; labels [N]
    int64. Labels outside [0, V) other than ignore_index are not checked on the Triton path.
    """
    return _ce_forward(logits, labels, scale, ignore_index)


@scaled_cross_entropy.register_fake
def _(logits, labels, scale, ignore_index=-100):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("cohere_fx::scaled_cross_entropy_backward", mutates_args=())
def scaled_cross_entropy_backward(dloss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, scale: float,
                                  ignore_index: int) -> Tensor:
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return _ce_backward(dloss, logits, labels, lse, scale, ignore_index, out)


@scaled_cross_entropy_backward.register_fake
def _(dloss, logits, labels, lse, scale, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _sce_setup_context(ctx, inputs, output):
    logits, labels, scale, ignore_index = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse)
    ctx.scale, ctx.ignore_index = scale, ignore_index


def _sce_backward(ctx, dloss, _dlse):
    logits, labels, lse = ctx.saved_tensors
    return scaled_cross_entropy_backward(dloss, logits, labels, lse, ctx.scale, ctx.ignore_index), None, None, None


scaled_cross_entropy.register_autograd(_sce_backward, setup_context=_sce_setup_context)


def _chunk_rows(vocab: int, itemsize: int, grad_weight: bool = False) -> int:
    """Rows per chunk. With a weight gradient each chunk re-reads and re-writes the [V, H] accumulator (4 GB of
    traffic for a bf16 256 000 x 4096 head), so those chunks are twice as large: half the passes."""
    rows = max(1, (CHUNK_BYTES << grad_weight) // (vocab * itemsize))
    return rows - rows % 128 if rows >= 128 else rows  # whole GEMM tiles


def _grad_buffer(t: Tensor, needed: bool) -> Tensor:
    """An uninitialised contiguous buffer for t's gradient, or an empty tensor when it is not needed. Contiguous
    whatever t's layout: the fake kernels promise it, and the in-place scale of the backward reads it flat."""
    return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty(0)


def _head_grads(hidden: Tensor, weight: Tensor, need_hidden: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
    """Buffers for the head's gradients (an empty tensor for one not needed); the chunks fill them."""
    grad_hidden, grad_weight = _grad_buffer(hidden, need_hidden), _grad_buffer(weight, need_weight)
    if need_weight and hidden.shape[0] == 0:
        grad_weight.zero_()  # otherwise the first chunk's GEMM writes it whole
    return grad_hidden, grad_weight


def _fold_chunk(dlogits: Tensor, weight: Tensor, hidden: Tensor, grad_hidden: Tensor, grad_weight: Tensor,
                start: int, scale: float = 1.0) -> None:
    """Fold the logits gradient of the rows from ``start`` into the head's gradients, times ``scale``: their
    rows of grad_hidden, and grad_weight (written by the first chunk, accumulated by the others)."""
    end = start + dlogits.shape[0]
    if grad_hidden.numel():
        torch.mm(dlogits, weight, out=grad_hidden[start:end])
        if scale != 1.0:
            grad_hidden[start:end].mul_(scale)
    if grad_weight.numel():
        grad_weight.addmm_(dlogits.t(), hidden[start:end], beta=0 if start == 0 else 1, alpha=scale)


def _loss_grad_coefficient(hidden: Tensor, divisor: Optional[Tensor]) -> Tensor:
    """d loss / d (a row's loss), fp32 0-dim on hidden's device: 1 for the sum, 1 / divisor for ``sum / divisor``
    (computed on the device, as autograd's division backward would: no host synchronisation)."""
    one = hidden.new_ones((), dtype=torch.float32)
    return one if divisor is None else one / divisor


def linear_cross_entropy_chunked(hidden: Tensor, weight: Tensor, labels: Tensor, scale: float, ignore_index: int,
                                 divisor: Optional[Tensor], grad_hidden: bool,
                                 grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, d loss / d hidden, d loss / d weight) for loss = the sum of the per-token losses, over ``divisor``
    when one is given; a gradient not asked for is an empty tensor."""
    n, v = hidden.shape[0], weight.shape[0]
    rows = min(n, _chunk_rows(v, hidden.element_size(), grad_weight))
    buf = hidden.new_empty((rows, v))
    loss = hidden.new_empty(n, dtype=torch.float32)
    coef = _loss_grad_coefficient(hidden, divisor).expand(rows)
    dhidden, dweight = _head_grads(hidden, weight, grad_hidden, grad_weight)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        y = labels[start:end]
        logits = torch.mm(hidden[start:end], weight.t(), out=buf[: end - start])
        chunk_loss, lse = _ce_forward(logits, y, scale, ignore_index)
        loss[start:end] = chunk_loss
        if grad_hidden or grad_weight:
            dlogits = _ce_backward(coef[: end - start], logits, y, lse, scale, ignore_index, out=logits)
            _fold_chunk(dlogits, weight, hidden, dhidden, dweight, start)
    total = loss.sum()
    return (total if divisor is None else total / divisor), dhidden, dweight


@torch.library.custom_op("cohere_fx::head_cross_entropy", mutates_args=())
def head_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, scale: float,
                       ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, loss, lse): HF's head ``(hidden @ weight.T) * scale`` [N, V] in hidden's dtype, rounded as HF
    rounds it (GEMM output, then the multiply, in one buffer), and the per-token loss of cross-entropy on it
    (fp32 [N], 0 on ignored rows) with the row logsumexp (not differentiable). For models that return logits.

    The backward never builds the [N, V] gradient: chunk by chunk it writes the loss gradient plus the logits'
    own incoming gradient, if any (summed in fp32, rounded once), into a chunk buffer and folds it into the
    hidden and weight gradients; ``scale`` is applied to the small operands (exact for power-of-two scales such
    as Command R's and R7B's, one rounding apart otherwise). Eager HF and inductor hold the logits, the scaled
    logits, the gradient and its scaled copy, 2 GB each at B2 x S2048 x 256 000 in bf16; this op holds the
    logits and a chunk. The weight gradient is accumulated in weight's dtype, one rounding per chunk (see the
    module doc).
    """
    logits = torch.mm(hidden, weight.t())
    if scale != 1.0:
        logits.mul_(scale)
    loss, lse = _ce_forward(logits, labels, 1.0, ignore_index)
    return logits, loss, lse


@head_cross_entropy.register_fake
def _(hidden, weight, labels, scale, ignore_index=-100):
    n = hidden.shape[0]
    return (hidden.new_empty((n, weight.shape[0])), hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty(n, dtype=torch.float32))


def _hce_setup_context(ctx, inputs, output):
    hidden, weight, labels, ctx.scale, ctx.ignore_index = inputs
    logits, _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no [N, V] zeros when the logits' own gradient is absent
    ctx.save_for_backward(hidden, weight, labels, logits, lse)


@torch.library.custom_op("cohere_fx::head_cross_entropy_backward", mutates_args=())
def head_cross_entropy_backward(dlogits: Optional[Tensor], dloss: Tensor, hidden: Tensor, weight: Tensor,
                                labels: Tensor, logits: Tensor, lse: Tensor, scale: float, ignore_index: int,
                                need_hidden: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
    """(grad_hidden, grad_weight), each an empty tensor when not needed; an op, so the chunk loop and its
    in-place GEMMs stay out of the traced backward graph (functionalisation would copy the buffers)."""
    grad_hidden, grad_weight = _head_grads(hidden, weight, need_hidden, need_weight)
    n, v = logits.shape
    rows = max(1, min(n, _chunk_rows(v, logits.element_size(), need_weight)))
    buf = logits.new_empty((rows, v))
    for start in range(0, n, rows):
        end = min(start + rows, n)
        chunk = _ce_backward(dloss[start:end], logits[start:end], labels[start:end], lse[start:end], 1.0,
                             ignore_index, out=buf[: end - start],
                             dlogits_in=None if dlogits is None else dlogits[start:end])
        _fold_chunk(chunk, weight, hidden, grad_hidden, grad_weight, start, scale)
    return grad_hidden, grad_weight


@head_cross_entropy_backward.register_fake
def _(dlogits, dloss, hidden, weight, labels, logits, lse, scale, ignore_index, need_hidden, need_weight):
    return _grad_buffer(hidden, need_hidden), _grad_buffer(weight, need_weight)


def _hce_backward(ctx, dlogits, dloss, _dlse):
    hidden, weight, labels, logits, lse = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[:2]
    if dloss is None:
        dloss = lse.new_zeros(lse.shape)
    grad_hidden, grad_weight = head_cross_entropy_backward(dlogits, dloss, hidden, weight, labels, logits, lse,
                                                           ctx.scale, ctx.ignore_index, need_hidden, need_weight)
    return grad_hidden if need_hidden else None, grad_weight if need_weight else None, None, None, None


head_cross_entropy.register_autograd(_hce_backward, setup_context=_hce_setup_context)


@torch.library.custom_op("cohere_fx::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, labels: Tensor, scale: float, ignore_index: int,
                                 divisor: Optional[Tensor], grad_hidden: bool,
                                 grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The loss and, where flagged, its gradients; see ``linear_cross_entropy``."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden [N, H] and weight [V, H] of one dtype expected, got "
                         f"{hidden.dtype} {tuple(hidden.shape)} and {weight.dtype} {tuple(weight.shape)}")
    if divisor is not None and divisor.dim() != 0:
        raise ValueError(f"linear_cross_entropy: divisor must be 0-dim, got {tuple(divisor.shape)}")
    return linear_cross_entropy_chunked(hidden, weight, labels, scale, ignore_index, divisor, grad_hidden,
                                        grad_weight)


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, labels, scale, ignore_index, divisor, grad_hidden, grad_weight):
    loss = hidden.new_empty((), dtype=torch.float32)
    return loss, _grad_buffer(hidden, grad_hidden), _grad_buffer(weight, grad_weight)


def _lce_setup_context(ctx, inputs, output):
    *_, grad_hidden, grad_weight = inputs
    _, dhidden, dweight = output
    ctx.mark_non_differentiable(dhidden, dweight)
    ctx.set_materialize_grads(False)  # else autograd hands the backward a zero [V, H] tensor for dweight
    ctx.save_for_backward(dhidden, dweight)
    ctx.computed = (grad_hidden, grad_weight)


def _scale_grad(g: Tensor, dloss: Tensor) -> Tensor:
    """g * dloss, in place. Eager, where Triton runs: the Triton scale, which leaves g untouched when dloss is 1
    (an unscaled loss, once 'mean' is folded into the op) and decides so on the device: no host synchronisation.

    Otherwise (no Triton, a tensor subclass, or any dispatch mode, which is what aot_autograd's joint trace is):
    ``mul_``, which AOT functionalises into a mul that inductor writes straight into the saved buffer (a donated
    buffer), fused with what follows (the tied embedding's gradient sum). A mutable custom op or a wrapped Triton
    kernel would be traced as a functional op on a clone of the [V, H] buffer: inductor reinplaces a mutated graph
    input only where the graph copies the result back into it, and a saved tensor never gets that copy. So the
    compiled backward multiplies on every step, copy-free, and eager skips a gradient of 1.
    """
    if runs_on_triton(g) and type(g) is torch.Tensor and not torch._C._len_torch_dispatch_stack():
        from cohere_fx.kernels.cross_entropy import scale_

        return scale_(g, dloss)
    return g.mul_(dloss)


def _lce_backward(ctx, dloss, _ddhidden, _ddweight):
    # The gradients were computed in the forward for a loss gradient of 1; they are scaled in place (a [V, H]
    # copy is 2 GB), so this backward may run only once.
    if getattr(ctx, "spent", False):
        raise RuntimeError("linear_cross_entropy: backward ran twice on one forward (retain_graph=True is not "
                           "supported: its gradients are scaled in place)")
    ctx.spent = True
    grads = []
    for name, needed, computed, g in zip(("hidden", "weight"), ctx.needs_input_grad, ctx.computed, ctx.saved_tensors):
        if needed and not computed:
            raise RuntimeError(f"linear_cross_entropy_forward: the gradient of {name} is needed but the forward "
                               f"ran with grad_{name}=False")
        grads.append(_scale_grad(g, dloss) if needed else None)
    return *grads, None, None, None, None, None, None


linear_cross_entropy_forward.register_autograd(_lce_backward, setup_context=_lce_setup_context)

_lib = torch.library.Library("cohere_fx", "FRAGMENT")
_lib.define("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, float scale, "
            "int ignore_index=-100, Tensor? divisor=None) -> Tensor")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, scale: float, ignore_index: int = -100,
                         divisor: Optional[Tensor] = None) -> Tensor:
    """fp32 sum over tokens of ``cross_entropy((hidden @ weight.T * scale).float(), labels)``, 0 for ignored
    labels, divided by ``divisor`` when one is given (a 0-dim tensor on any device, not differentiated):
    HF's 'mean' is the sum over the count of non-ignored labels. hidden [N, H], weight [V, H] (the tied
    embedding), labels [N] int64 already shifted. The [N, V] logits are never materialised.
    """
    grad = torch.is_grad_enabled()
    loss, _, _ = torch.ops.cohere_fx.linear_cross_entropy_forward(
        hidden, weight, labels, scale, ignore_index, divisor, grad and hidden.requires_grad,
        grad and weight.requires_grad)
    return loss


_lib.impl("linear_cross_entropy", linear_cross_entropy, "CompositeImplicitAutograd")
