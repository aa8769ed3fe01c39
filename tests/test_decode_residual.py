"""decode_residual: the kernel (under TRITON_INTERPRET=1 on CPU) against the unfused ops it replaces and fp64, the op
(leading dims, fallback, opcheck), and the pattern on traced decode steps (one per layer, Cohere and Cohere2;
nothing in training graphs or prefill)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
import cohere_fx.ops  # noqa: F401
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from cohere_fx.kernels.decode_residual import decode_residual_fwd
from cohere_fx.ops.decode_residual import decode_residual_reference
from cohere_fx.runtime.decode_runner import decode_step
from decode_steps import two_slot_step

op = torch.ops.cohere_fx.decode_residual
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernel on a GPU, the interpreter in CI
ULP = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}  # unit roundoff


def layer_tail(rows, n, ka, kf, dtype, device=DEVICE):
    """residual, attn, o_weight, gate, up, down_weight of one decode layer, scaled like a trained model's."""
    rand = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return rand(rows, n), rand(rows, ka), rand(n, ka) / ka ** 0.5, rand(rows, kf), rand(rows, kf), \
        rand(n, kf) / kf ** 0.5


def fp64_math(residual, attn, o_weight, gate, up, down_weight):
    d = [t.double().cpu() for t in (residual, attn, o_weight, gate, up, down_weight)]
    return d[0] + d[1] @ d[2].t() + (F.silu(d[3]) * d[4]) @ d[5].t()


def assert_rounds_like_unfused(out, inputs):
    """Each output is within one rounding of the unfused ops' (eager's roundings, another accumulation order)
    and the whole is as close to fp64 as the unfused ops are."""
    ref = decode_residual_reference(*[t.cpu() for t in inputs])
    exact = fp64_math(*inputs)
    scale = exact.abs().max().item()
    tol = 4 * ULP[out.dtype] * scale
    assert (out.cpu().double() - ref.double()).abs().max().item() <= tol
    err = (out.cpu().double() - exact).norm() / exact.norm()
    ref_err = (ref.double() - exact).norm() / exact.norm()
    assert err <= 2 * ref_err + 4 * ULP[out.dtype], (err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_kernel_equals_unfused_ops(dtype, rows):
    """Sizes that are no multiple of the blocks or the chunk: the last chunk of each K and the last feature block
    are partial."""
    torch.manual_seed(rows)
    inputs = layer_tail(rows, n=40, ka=48, kf=136, dtype=dtype)
    for config in ((16, 16, 32, 4, 1), (32, 32, 64, 4, 2), (16, 64, 64, 4, 1)):  # 2-9 splits, 2-3 blocks
        out = decode_residual_fwd(*inputs, config=config)
        assert out.shape == (rows, 40) and out.dtype == dtype
        assert_rounds_like_unfused(out, inputs)


def test_kernel_result_does_not_depend_on_the_split():
    """The partial sums are added in a fixed order: one split of K gives the same fp32 value as the unfused
    o_proj and down_proj dot products up to reassociation, and repeated launches agree bitwise."""
    torch.manual_seed(1)
    inputs = layer_tail(3, n=32, ka=64, kf=96, dtype=torch.float32)
    first = decode_residual_fwd(*inputs, config=(16, 32, 32, 4, 1))
    torch.testing.assert_close(decode_residual_fwd(*inputs, config=(16, 32, 32, 4, 1)), first, rtol=0, atol=0)
    torch.testing.assert_close(decode_residual_fwd(*inputs, config=(16, 32, 128, 4, 1)), first, rtol=1e-6, atol=1e-6)


def test_kernel_refuses_what_it_cannot_run():
    inputs = list(layer_tail(4, n=16, ka=32, kf=48, dtype=torch.float32))
    too_many = [torch.randn(17, t.shape[1], device=DEVICE) if i in (0, 1, 3, 4) else t for i, t in enumerate(inputs)]
    with pytest.raises(ValueError, match="M <= 16"):
        decode_residual_fwd(*too_many)
    with pytest.raises(ValueError, match="row-major"):
        decode_residual_fwd(*inputs[:2], inputs[2].t().contiguous().t(), *inputs[3:])
    with pytest.raises(ValueError, match="one dtype"):
        decode_residual_fwd(*inputs[:5], inputs[5].double())


def test_op_keeps_leading_dims_and_falls_back_beyond_the_kernel():
    torch.manual_seed(0)
    for rows in (2, 40):  # a decode batch [2, 1, N]; prefill-sized rows take the torch reference
        residual, attn, wo, gate, up, wd = layer_tail(rows, n=24, ka=32, kf=64, dtype=torch.float32)
        args = (residual[:, None], attn[:, None], wo, gate[:, None], up[:, None], wd)
        out = op(*args)
        assert out.shape == (rows, 1, 24)
        torch.testing.assert_close(out, decode_residual_reference(*args), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(op, args)
    with pytest.raises(ValueError, match="down_weight"):
        op(*args[:5], wd[:, :8])


def tiny_model(kind="cohere"):
    torch.manual_seed(0)
    if kind == "cohere":
        return CohereForCausalLM(tiny_cohere_config(layers=2, initializer_range=0.2)).eval()
    return Cohere2ForCausalLM(tiny_cohere2_config(layers=4, initializer_range=0.2, sliding_window=4)).eval()


def decode_report(model, options=None):
    runner, bucket = two_slot_step(model)
    with torch.no_grad():
        return cohere_fx.explain(decode_step, model, bucket.view, bucket.input_ids, bucket.position_ids,
                                 options=options)


@pytest.mark.parametrize("kind", ["cohere", "cohere2"])
def test_decode_step_ends_each_layer_in_one_op(kind):
    model = tiny_model(kind)
    report = decode_report(model)
    layers = model.config.num_hidden_layers
    assert report.matches["decode_residual"] == layers and not report.near_misses["decode_residual"]
    (graph,) = report.graphs
    assert graph.after.count("= cohere_fx.decode_residual(") == layers
    for gone in ("cohere_fx.swiglu(", "cohere_fx.parallel_residual(", "o_proj.weight, None)",
                 "down_proj.weight, None)"):
        assert gone not in graph.after


def test_needs_the_swiglu_and_parallel_residual_ops():
    """It reads the ops those patterns write: without them there is nothing to match."""
    report = decode_report(tiny_model(), options={"inductor": False, "passes": ["decode_residual"]})
    assert report.matches["decode_residual"] == 0


@pytest.mark.parametrize("kind", ["cohere", "cohere2"])
def test_rewritten_decode_step_equals_eager(kind):
    model = tiny_model(kind)
    runner, bucket = two_slot_step(model)
    args = (model, bucket.view, bucket.input_ids, bucket.position_ids)
    pools = [p.clone() for p in (*bucket.view.k_pools, *bucket.view.v_pools)]
    with torch.no_grad():
        eager = decode_step(*args)
        for live, saved in zip((*bucket.view.k_pools, *bucket.view.v_pools), pools):
            live.copy_(saved)
        compiled = torch.compile(decode_step, backend="cohere_fx", fullgraph=True, options={"inductor": False})(*args)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_not_applied_with_gradients_or_many_rows():
    model = tiny_model().train()
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    report = cohere_fx.explain(model, input_ids=ids, labels=ids, use_cache=False)  # training graph
    assert report.matches["decode_residual"] == 0 and not report.near_misses["decode_residual"]
    with torch.no_grad():  # inference, but 2 x 20 rows: a prefill
        ids = torch.randint(0, model.config.vocab_size, (2, 20))
        report = cohere_fx.explain(model.eval(), input_ids=ids, use_cache=False)
    assert report.matches["decode_residual"] == 0 and report.matches["parallel_residual"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
def test_cuda_command_r7b_shapes(rows):
    """The compiled kernel at Command-R7B's shapes (hidden 4096, MLP 14336): within a few bf16 roundings of the
    unfused ops (the concurrent partials and their counter are exercised for real only here)."""
    torch.manual_seed(0)
    inputs = layer_tail(rows, n=4096, ka=4096, kf=14336, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):  # fresh counters every launch
        out = op(*inputs)
        assert_rounds_like_unfused(out, inputs)
