"""swiglu_lora_shrink: the fused backward (under TRITON_INTERPRET=1 on CPU) against the unfused ops it replaces and
against fp64; opcheck; the pattern on PEFT LoRA models (one match per layer, gradients as without it) and where it
must not match."""
import pytest
import torch

import cohere_fx
import cohere_fx.ops  # noqa: F401
from cohere_fx.kernels.lora import lora_shrink_bwd
from cohere_fx.kernels.swiglu import swiglu_bwd, swiglu_fwd
from cohere_fx.kernels.swiglu_lora_shrink import swiglu_lora_shrink_bwd
from parity import rel_err
from test_lora_ops import lora_grads, lora_model

ops = torch.ops.cohere_fx
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backward_inputs(m, n, r, dtype=torch.bfloat16, device=DEVICE):
    torch.manual_seed(m + n + r)
    rand = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    return rand(m, n).to(dtype), rand(m, r), rand(m, n).to(dtype), rand(m, n).to(dtype), rand(r, n) / n ** 0.5


def unfused_backward(dact, dh, gate, up, a):
    """What the graph ran before the fusion: SwiGLU recomputed, lora_shrink's backward, autograd's sum of act's two
    gradients in its dtype, SwiGLU's backward (the same kernels)."""
    dx, da = lora_shrink_bwd(dh, swiglu_fwd(gate, up), a)
    return (*swiglu_bwd(dact + dx, gate, up), da)


def assert_equals_unfused(m, n, r, dtype=torch.bfloat16, device=DEVICE):
    inputs = backward_inputs(m, n, r, dtype, device)
    dgate, dup, da = swiglu_lora_shrink_bwd(*inputs)
    want_dgate, want_dup, want_da = unfused_backward(*inputs)
    for got, want in ((dgate, want_dgate), (dup, want_dup)):
        assert got.dtype == dtype and got.shape == want.shape
        same = (got == want).float().mean().item()
        assert same > 0.999, same  # the same roundings; dh @ A's fp32 sums may differ
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
    act = swiglu_fwd(inputs[2], inputs[3]).double()  # the forward's act, rounded as it was
    tolerance = 1e-6 if m <= 1024 else 1e-5  # fp32 sums over the tokens, in another order than the unfused kernel's
    errors = rel_err(da, want_da), rel_err(da, inputs[1].double().t() @ act)
    assert da.dtype == torch.float32 and max(errors) < tolerance, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(100, 72, 4), (300, 200, 16), (64, 130, 20)], ids=["r4", "r16", "r20"])
def test_kernel_equals_the_unfused_ops(dtype, shape):
    """Ragged tiles on both sides, several token partitions, ranks that pad to 16 and 32."""
    assert_equals_unfused(*shape, dtype)


@pytest.mark.gpu
def test_cuda_r7b_down_proj_shapes():
    """The compiled kernel at r7b's intermediate size, 4096 tokens, rank 16 (bf16 tensor-core dots of the parts)."""
    assert_equals_unfused(4096, 14336, 16, device="cuda")


def test_op_opcheck_forward_backward_and_refusals():
    dact, dh, gate, up, a = backward_inputs(8, 24, 4)
    torch.library.opcheck(ops.swiglu_lora_shrink, (gate.requires_grad_(), up.requires_grad_(), a.requires_grad_()))
    act, h = ops.swiglu_lora_shrink(gate, up, a)
    torch.testing.assert_close(act, ops.swiglu(gate, up), rtol=0, atol=0)
    torch.testing.assert_close(h, ops.lora_shrink(act, a), rtol=0, atol=0)
    dgate, dup, da = torch.autograd.grad((act, h), (gate, up, a), (dact, dh))
    for got, want in zip((dgate, dup, da), unfused_backward(dact, dh, gate.detach(), up.detach(), a.detach())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fp32"):
        ops.swiglu_lora_shrink(gate, up, a.bfloat16())
    with pytest.raises(ValueError, match="differ"):
        ops.swiglu_lora_shrink(gate, up[:, :12], a)


def test_lora_model_matches_once_per_layer_and_keeps_its_gradients():
    """One match per layer (down's adapter reads the SwiGLU output); LoRA gradients as with the unfused ops, within
    bf16 rounding; the forward keeps no SwiGLU output for the backward."""
    layers, model, ids = 2, lora_model(), torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches["swiglu_lora_shrink"] == layers and not report.near_misses["swiglu_lora_shrink"]
    assert report.matches["swiglu"] == layers and report.matches["lora_shrink"] == 3 * layers
    fused = lora_grads(model, ids)
    unfused = lora_grads(model, ids, [p for p in cohere_fx.patterns.PATTERNS if p != "swiglu_lora_shrink"])
    worst = max(fused, key=lambda n: rel_err(fused[n], unfused[n]))
    assert rel_err(fused[worst], unfused[worst]) < 1e-2, (worst, rel_err(fused[worst], unfused[worst]))


def test_left_alone_without_a_lora_shrink_or_above_its_rank():
    ids = torch.randint(3, 128, (2, 8))
    dropout = cohere_fx.explain(lora_model(dropout=0.1), ids, labels=ids)  # down's adapter reads a dropout sample
    assert dropout.matches["swiglu_lora_shrink"] == 0 and dropout.matches["swiglu"] == 2
    wide = cohere_fx.explain(lora_model(rank=40), ids, labels=ids)
    assert wide.matches["swiglu_lora_shrink"] == 0
    assert all("rank 40 is above" in reason for reason in wide.near_misses["swiglu_lora_shrink"])
    assert len(wide.near_misses["swiglu_lora_shrink"]) == 2


def test_left_alone_where_the_mlp_input_needs_no_gradient():
    """LoRA on down_proj alone: layer 0's gate and up come from frozen projections of the frozen embedding's norm,
    so only A needs a gradient there and the match is refused (the fused op would make the base projection compute
    act's); layer 1 reads layer 0's LoRA output and matches."""
    model, ids = lora_model(targets=["down_proj"]), torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches["swiglu_lora_shrink"] == 1
    (miss,) = report.near_misses["swiglu_lora_shrink"]
    assert "need no gradient" in miss
