"""``cohere_fx::qk_norm_rope`` / ``cohere_fx::rope`` (Triton kernel and torch reference) against HF's own code.

The references are the HF functions themselves: ``CohereLayerNorm`` for q_norm/k_norm, ``apply_rotary_pos_emb``
after ``transpose(1, 2)``, cos/sin from ``CohereRotaryEmbedding`` of a small ``CohereConfig`` with position ids
that are not 0..S-1 (left padding, a decode offset). q and k are views of one fused projection output, as in
a graph. fp32 must match tightly; bf16 must match HF bit for bit up to rare one-ulp flips (the kernel rounds
where HF rounds). On CPU the kernel runs under Triton's interpreter (conftest); the ``gpu`` test runs D = 128.
"""
import pytest
import torch
from transformers import CohereConfig
from transformers.models.cohere.modeling_cohere import CohereLayerNorm, CohereRotaryEmbedding, apply_rotary_pos_emb

import cohere_fx.ops  # noqa: F401  (registers torch.ops.cohere_fx.*)
from cohere_fx.kernels import qk_norm_rope as kernels
from cohere_fx.ops import qk_norm_rope as ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, S, H, Hk, D): GQA and MHA at the head dims CI covers.
SHAPES = [(2, 5, 4, 2, 16), (2, 3, 2, 2, 64)]


def make_case(shape, dtype, positions, eps=1e-5, device=DEVICE):
    """q, k (views of one fused qkv projection output, which is the grad leaf), cos, sin, q_norm, k_norm."""
    b, s, h, hk, d = shape
    config = CohereConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=hk, use_qk_norm=True,
                          layer_norm_eps=eps)
    if positions == "left_pad":  # Bc = B; HF's position ids for a left-padded batch: cumsum(mask) - 1, pads at 1
        pad = torch.arange(b)[:, None] * 2
        position_ids = (torch.arange(s)[None, :] - pad).masked_fill(torch.arange(s)[None, :] < pad, 1)
    else:  # Bc = 1: a chunk of a longer sequence, broadcast over the batch
        position_ids = torch.arange(100, 100 + s)[None, :]
    cos, sin = CohereRotaryEmbedding(config)(torch.zeros((), dtype=dtype), position_ids)
    if positions == "expanded":  # [B, S, D] with batch stride 0
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    qkv = (0.5 + torch.randn(b, s, (h + 2 * hk) * d, dtype=torch.float64)).to(dtype)
    norms = []
    for heads in (h, hk):
        norm = CohereLayerNorm((heads, d), eps=eps)
        with torch.no_grad():
            norm.weight.copy_(1.0 + 0.5 * torch.randn(heads, d))
        norms.append(norm.to(device, dtype))
    qkv = qkv.to(device).requires_grad_()
    q = qkv[..., : h * d].view(b, s, h, d)
    k = qkv[..., h * d: (h + hk) * d].view(b, s, hk, d)
    return qkv, q, k, cos.to(device), sin.to(device), *norms


def hf(q, k, cos, sin, q_norm=None, k_norm=None):
    """The HF attention's lines between the projections and SDPA."""
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def run(q, k, cos, sin, q_norm=None, k_norm=None):
    if q_norm is None:
        return torch.ops.cohere_fx.rope(q, k, cos, sin)
    return torch.ops.cohere_fx.qk_norm_rope(q, k, cos, sin, q_norm.weight, k_norm.weight, q_norm.variance_epsilon)


def ulps(actual, expected):
    """Distance in bf16 units in the last place (bit patterns mapped to a monotonic integer line)."""
    def line(t):
        bits = t.detach().cpu().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (line(actual) - line(expected)).abs()


def assert_matches_hf(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        return
    # bf16: the same roundings as HF; a summation order that differs from torch's may flip a rounding now and then.
    distance = ulps(actual, expected)
    assert (distance > 0).double().mean() < 0.01 and (distance > 1).double().mean() < 1e-3, distance.max()


def rel_err(actual, expected):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("positions", ["left_pad", "offset", "expanded"])
@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm_rope", "rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_hf(shape, dtype, norm, positions):
    _, q, k, cos, sin, q_norm, k_norm = make_case(shape, dtype, positions)
    norms = (q_norm, k_norm) if norm else ()
    with torch.no_grad():
        q_out, k_out = run(q, k, cos, sin, *norms)
        q_ref, k_ref = hf(q, k, cos, sin, *norms)
    b, s, h, hk, d = shape
    assert q_out.shape == (b, h, s, d) and k_out.shape == (b, hk, s, d)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert_matches_hf(q_out, q_ref)
    assert_matches_hf(k_out, k_ref)


def check_backward(shape, dtype, positions, norm, any_cos_sin=False):
    qkv, q, k, cos, sin, q_norm, k_norm = make_case(shape, dtype, positions, eps=1e-2)
    if any_cos_sin:
        cos, sin = torch.randn_like(cos), torch.randn_like(sin)
    norms = (q_norm, k_norm) if norm else ()
    params = [qkv, q_norm.weight, k_norm.weight] if norm else [qkv]
    # Upstream grads that are not contiguous in [B, H, S, D] (SDPA's may not be either).
    dq = torch.randn(q.shape, device=q.device, dtype=dtype).transpose(1, 2)
    dk = torch.randn(k.shape, device=k.device, dtype=dtype).transpose(1, 2)
    grads = torch.autograd.grad(run(q, k, cos, sin, *norms), params, (dq, dk))
    expected = torch.autograd.grad(hf(q, k, cos, sin, *norms), params, (dq, dk))
    for got, want in zip(grads, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        elif got.shape == qkv.shape:
            assert_matches_hf(got, want)  # the gradient reaching the norm is rounded to bf16, as in HF
        else:  # weight grads: a few elements, each a sum over B * S in another order than autograd's
            assert rel_err(got, want) < 1e-3


@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm_rope", "rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_hf(shape, dtype, norm):
    check_backward(shape, dtype, "left_pad", norm)


@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm_rope", "rope"])
def test_any_cos_sin(norm):
    """cos and sin are used element for element, as HF does: cos[2i] != cos[2i + 1] must still match."""
    _, q, k, cos, sin, q_norm, k_norm = make_case(SHAPES[0], torch.float32, "left_pad")
    cos, sin = torch.randn_like(cos), torch.randn_like(sin)
    norms = (q_norm, k_norm) if norm else ()
    with torch.no_grad():
        for out, ref in zip(run(q, k, cos, sin, *norms), hf(q, k, cos, sin, *norms)):
            assert_matches_hf(out, ref)
    check_backward(SHAPES[0], torch.float32, "left_pad", norm, any_cos_sin=True)


def test_head_blocks(monkeypatch):
    """Several head blocks per token (as at H = 96, D = 128), the last one partly masked."""
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 64)  # 4 heads of D = 16 per block
    shape = (2, 3, 6, 3, 16)
    _, q, k, cos, sin, q_norm, k_norm = make_case(shape, torch.float32, "offset")
    with torch.no_grad():
        for out, ref in zip(run(q, k, cos, sin, q_norm, k_norm), hf(q, k, cos, sin, q_norm, k_norm)):
            assert_matches_hf(out, ref)
    check_backward(shape, torch.float32, "offset", norm=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_path(monkeypatch, dtype):
    """The torch reference the ops use where Triton cannot run (CPU without the interpreter, other head dims)."""
    monkeypatch.setattr(ops, "_on_triton", lambda t: False)
    _, q, k, cos, sin, q_norm, k_norm = make_case(SHAPES[0], dtype, "left_pad")
    with torch.no_grad():
        for norms in [(q_norm, k_norm), ()]:
            for out, ref in zip(run(q, k, cos, sin, *norms), hf(q, k, cos, sin, *norms)):
                assert out.is_contiguous()
                assert torch.equal(out, ref)  # same ops in the same order
    for norm in (True, False):
        check_backward(SHAPES[0], dtype, "left_pad", norm)


def test_mixed_dtypes_rejected():
    _, q, k, cos, sin, q_norm, k_norm = make_case(SHAPES[0], torch.float32, "offset")
    with pytest.raises(ValueError, match="dtypes differ"):
        torch.ops.cohere_fx.rope(q, k.to(torch.bfloat16), cos, sin)


@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm_rope", "rope"])
def test_opcheck(norm):
    _, q, k, cos, sin, q_norm, k_norm = make_case((1, 3, 2, 1, 16), torch.float32, "expanded")
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    grads = tuple(torch.randn(1, heads, 3, 16, device=DEVICE) for heads in (2, 1))
    if norm:
        weights = (q_norm.weight.detach().requires_grad_(), k_norm.weight.detach().requires_grad_())
        torch.library.opcheck(torch.ops.cohere_fx.qk_norm_rope.default, (q, k, cos, sin, *weights, 1e-5))
        torch.library.opcheck(torch.ops.cohere_fx.qk_norm_rope_backward.default,
                              (*grads, q.detach(), k.detach(), cos, sin, *(w.detach() for w in weights), 1e-5))
    else:
        torch.library.opcheck(torch.ops.cohere_fx.rope.default, (q, k, cos, sin))
        torch.library.opcheck(torch.ops.cohere_fx.rope_backward.default, (*grads, cos, sin))


@pytest.mark.gpu
@pytest.mark.parametrize("positions", ["left_pad", "expanded"])
@pytest.mark.parametrize("shape", [(2, 64, 8, 2, 128), (1, 16, 96, 8, 128)])
def test_head_dim_128_gpu(shape, positions):
    _, q, k, cos, sin, q_norm, k_norm = make_case(shape, torch.bfloat16, positions)
    for norms in [(q_norm, k_norm), ()]:
        with torch.no_grad():
            for out, ref in zip(run(q, k, cos, sin, *norms), hf(q, k, cos, sin, *norms)):
                assert out.is_contiguous()
                assert_matches_hf(out, ref)
    for norm in (True, False):
        check_backward(shape, torch.bfloat16, positions, norm)
