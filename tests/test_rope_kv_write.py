"""rope_kv_write: the kernel (under TRITON_INTERPRET=1 on CPU) against qk_norm_rope/rope + the cache's own write,
the op (opcheck, fallback), the pattern on traced decode steps (Cohere with and without QK-norm, Cohere2 whose
global layers have no RoPE). That inductor writes the pools in place (no copy of a pool) is asserted on the
compiled runner step: tests/test_decode_runner.py::test_inductor_step_writes_pools_in_place."""
import pytest
import torch
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
import cohere_fx.ops  # noqa: F401
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from cohere_fx.kernels.rope_kv_write import rope_kv_write_fwd
from cohere_fx.ops.rope_kv_write import rope_kv_write_reference
from cohere_fx.runtime.decode_runner import decode_step
from cohere_fx.runtime.paged_cache import write_rows
from decode_steps import two_slot_step

op = torch.ops.cohere_fx.rope_kv_write
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def decode_inputs(b=3, h=4, hk=2, d=16, pages=5, block_size=4, dtype=torch.float32, norm=True, device=DEVICE):
    """One decode token per sequence: q, k as views of one projection output, v transposed as HF hands it over,
    cos/sin of distinct positions, norm weights (or None), random pools and distinct slots."""
    rand = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    qkv = rand(b, 1, (h + 2 * hk) * d)
    q = qkv[..., :h * d].view(b, 1, h, d)
    k = qkv[..., h * d:(h + hk) * d].view(b, 1, hk, d)
    v = qkv[..., (h + hk) * d:].view(b, 1, hk, d).transpose(1, 2)
    angles = torch.arange(7, 7 + b, device=device)[:, None, None] * torch.linspace(0.1, 1, d, device=device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    weights = (1 + 0.3 * rand(h, d), 1 + 0.3 * rand(hk, d)) if norm else (None, None)
    pools = [rand(pages, block_size, hk, d) for _ in range(2)]
    slots = torch.randperm(pages * block_size, device=device)[:b]
    return q, k, v, cos, sin, *weights, 1e-5, *pools, slots


def unfused(q, k, v, cos, sin, q_weight, k_weight, eps, k_pool, v_pool, slots):
    """What the decode graph ran before the fusion: the RoPE op (its own kernel), then the cache's write."""
    if q_weight is None:
        q_out, k_out = torch.ops.cohere_fx.rope(q, k, cos, sin)
    else:
        q_out, k_out = torch.ops.cohere_fx.qk_norm_rope(q, k, cos, sin, q_weight, k_weight, eps)
    write_rows(k_pool, slots, k_out[:, :, -1])
    write_rows(v_pool, slots, v[:, :, -1])
    return q_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm_rope", "rope"])
@pytest.mark.parametrize("d", [16, 64])
def test_kernel_equals_rope_and_the_cache_write(dtype, norm, d):
    """q and the pools bit for bit as the RoPE op and the cache's write leave them (the same rotation code; the
    RoPE op itself is checked against HF in test_qk_norm_rope.py), and as the torch reference within rounding;
    every other pool row untouched."""
    torch.manual_seed(d)
    *args, k_pool, v_pool, slots = decode_inputs(d=d, dtype=dtype, norm=norm)
    outs = []
    for fn in (rope_kv_write_fwd, unfused, rope_kv_write_reference):
        pools = k_pool.clone(), v_pool.clone()
        outs.append((fn(*args, *pools, slots), *pools))
    for got, want in zip(outs[0], outs[1]):
        assert torch.equal(got, want)
    for got, want in zip(outs[0], outs[2]):
        tol = {} if dtype == torch.float32 else {"rtol": 2 ** -7, "atol": 2 ** -7}
        torch.testing.assert_close(got, want, **tol)
    _, kp, vp = outs[0]
    untouched = torch.ones(k_pool.shape[0] * k_pool.shape[1], dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    for before, after in ((k_pool, kp), (v_pool, vp)):
        assert torch.equal(before.flatten(0, 1)[untouched], after.flatten(0, 1)[untouched])
        assert not torch.equal(before.flatten(0, 1)[slots], after.flatten(0, 1)[slots])


def test_kernel_refuses_what_it_cannot_run():
    inputs = list(decode_inputs())
    two_tokens = [torch.cat([t, t], 2 if i == 2 else 1) for i, t in enumerate(inputs[:5])]
    with pytest.raises(ValueError, match="one token per sequence"):
        rope_kv_write_fwd(*two_tokens, *inputs[5:])
    with pytest.raises(ValueError, match="dtype"):
        rope_kv_write_fwd(*inputs[:8], inputs[8].double(), *inputs[9:])


def test_op_opcheck_and_the_fallback_for_longer_steps():
    torch.library.opcheck(op, decode_inputs())
    # two tokens per sequence (beyond the kernel): the reference writes the last one, as the cache does
    q, k, v, cos, sin, qw, kw, eps, k_pool, v_pool, slots = decode_inputs(b=2)
    q2, k2, v2 = torch.cat([q, q], 1), torch.cat([k, k], 1), torch.cat([v, v], 2)
    cos2, sin2 = torch.cat([cos, cos], 1), torch.cat([sin, sin], 1)
    out = op(q2, k2, v2, cos2, sin2, qw, kw, eps, k_pool, v_pool, slots)
    assert out.shape == (2, 4, 2, 16)
    torch.testing.assert_close(v_pool.flatten(0, 1)[slots], v[:, :, -1])
    with pytest.raises(ValueError, match="both norm weights"):
        op(q, k, v, cos, sin, qw, None, eps, k_pool, v_pool, slots)


def tiny_model(kind):
    torch.manual_seed(0)
    if kind == "cohere2":
        return Cohere2ForCausalLM(tiny_cohere2_config(layers=4, initializer_range=0.2, sliding_window=4)).eval()
    return CohereForCausalLM(tiny_cohere_config(layers=2, initializer_range=0.2,
                                                use_qk_norm=kind == "cohere")).eval()


@pytest.mark.parametrize("kind", ["cohere", "cohere_no_qk_norm", "cohere2"])
def test_decode_step_writes_the_cache_from_the_rope_kernel(kind):
    """Every layer with RoPE (all Cohere layers; Cohere2's sliding ones, not its NoPE global layers) loses its
    two index_put writes and its RoPE op to the one op."""
    model = tiny_model(kind)
    runner, bucket = two_slot_step(model)
    with torch.no_grad():
        report = cohere_fx.explain(decode_step, model, bucket.view, bucket.input_ids, bucket.position_ids)
    layers = model.config.num_hidden_layers
    roped = sum(t == "sliding_attention" for t in model.config.layer_types) if kind == "cohere2" else layers
    assert report.matches["rope_kv_write"] == roped and not report.near_misses["rope_kv_write"]
    after = report.graphs[0].after
    assert after.count("= cohere_fx.rope_kv_write(") == roped
    assert after.count("= setitem(") == 2 * (layers - roped)
    assert "= cohere_fx.qk_norm_rope(" not in after and "= cohere_fx.rope(" not in after


@pytest.mark.parametrize("kind", ["cohere", "cohere2"])
def test_rewritten_decode_step_equals_eager_and_writes_the_same_pages(kind):
    model = tiny_model(kind)
    runner, bucket = two_slot_step(model)
    args = (model, bucket.view, bucket.input_ids, bucket.position_ids)
    pools = (*bucket.view.k_pools, *bucket.view.v_pools)
    saved = [p.clone() for p in pools]
    with torch.no_grad():
        eager = decode_step(*args)
        eager_pools = [p.clone() for p in pools]
        for live, before in zip(pools, saved):
            live.copy_(before)
        compiled = torch.compile(decode_step, backend="cohere_fx", fullgraph=True,
                                 options={"inductor": False,
                                          "passes": ["qk_norm_rope", "rope", "rope_kv_write"]})(*args)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for live, ref in zip(pools, eager_pools):
        torch.testing.assert_close(live, ref, atol=1e-6, rtol=1e-6)
