"""decode_residual: the kernel (under TRITON_INTERPRET=1 on CPU) bitwise against the unfused kernels it replaces
(decode_linear for o and down, then the parallel residual), the op against eager math, opcheck, and the pattern on
traced decode steps of Cohere and Cohere2 (one launch per layer, the step still equal to eager; nothing in
training graphs)."""
import pytest
import torch
import torch.nn.functional as F

import cohere_fx
import cohere_fx.ops  # noqa: F401
from cohere_fx.kernels.decode_linear import decode_linear_fwd
from cohere_fx.kernels.decode_residual import decode_residual_fwd
from cohere_fx.passes.manager import pass_names
from cohere_fx.runtime.decode_runner import decode_step
from decode_steps import assert_compiled_step_equals_eager, explain_decode_step, tiny_models

op = torch.ops.cohere_fx.decode_residual
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernel on a GPU, the interpreter in CI


def unfused(residual, attn, o_weight, mlp, down_weight, config=None):
    """What the step ran before this fusion: two decode_linear launches, then residual + attn + mlp as eager
    rounds it (the parallel_residual op is bitwise eager's)."""
    (o,) = decode_linear_fwd(attn, [o_weight], config)
    (down,) = decode_linear_fwd(mlp, [down_weight], config)
    return residual + o + down


def layer_tensors(rows, n, ko, kd, dtype, device=DEVICE):
    def rand(*size, scale=1.0):
        return torch.randn(*size, dtype=dtype, device=device) * scale

    return rand(rows, n), rand(rows, ko), rand(n, ko, scale=ko ** -0.5), rand(rows, kd), rand(n, kd, scale=kd ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_kernel_is_bitwise_the_unfused_kernels(dtype, rows):
    """N = 40 is not a multiple of BLOCK_N, Ko = 96 and Kd = 160 not of BLOCK_K: every mask is exercised."""
    torch.manual_seed(0)
    tensors = layer_tensors(rows, 40, 96, 160, dtype)
    config = (16, 32, 4, 1, True)
    out = decode_residual_fwd(*tensors, config=config)
    assert out.dtype == dtype and out.shape == (rows, 40)
    assert torch.equal(out, unfused(*tensors, config=config))
    residual, attn, o_weight, mlp, down_weight = (t.double() for t in tensors)
    exact = residual + attn @ o_weight.t() + mlp @ down_weight.t()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)


def test_kernel_refuses_what_it_cannot_run():
    tensors = layer_tensors(4, 8, 16, 24, torch.float32)
    residual, attn, o_weight, mlp, down_weight = tensors
    with pytest.raises(ValueError, match="M <= 16"):
        decode_residual_fwd(residual.repeat(5, 1), attn.repeat(5, 1), o_weight, mlp.repeat(5, 1), down_weight)
    with pytest.raises(ValueError, match="row-major"):
        decode_residual_fwd(residual, attn, o_weight.t().contiguous().t(), mlp, down_weight)
    with pytest.raises(ValueError, match="one dtype"):
        decode_residual_fwd(residual, attn, o_weight, mlp, down_weight.double())
    with pytest.raises(ValueError, match=r"\[N, Kd\]"):
        decode_residual_fwd(residual, attn, o_weight, mlp, down_weight[:, :8].contiguous())


def test_op_keeps_leading_dims_falls_back_beyond_the_kernel_and_passes_opcheck():
    torch.manual_seed(0)
    residual, attn, o_weight, mlp, down_weight = layer_tensors(6, 24, 32, 48, torch.float32)
    for lead in ((2, 3), (3, 2, 1)):  # decode rows, and a leading shape the kernel takes as 6 rows
        args = (residual.view(*lead, 24), attn.view(*lead, 32), o_weight, mlp.view(*lead, 48), down_weight)
        out = op(*args)
        assert out.shape == (*lead, 24)
        torch.testing.assert_close(out, args[0] + F.linear(args[1], o_weight) + F.linear(args[3], down_weight))
        torch.library.opcheck(op, args)
    wide = layer_tensors(20, 24, 32, 48, torch.float32)  # 20 rows: a prefill, the torch reference
    torch.testing.assert_close(op(*wide), wide[0] + F.linear(wide[1], wide[2]) + F.linear(wide[3], wide[4]))
    with pytest.raises(ValueError, match="decode_residual"):
        op(residual, attn, o_weight, mlp, down_weight[:8])


@pytest.mark.parametrize("index", [0, 1], ids=["cohere", "cohere2"])
def test_decode_step_has_one_launch_per_layer_and_equals_eager(index):
    model = tiny_models()[index]
    report, args = explain_decode_step(model)
    layers = model.config.num_hidden_layers
    assert report.matches["decode_residual"] == layers
    (graph,) = report.graphs
    after = graph.after.splitlines()
    assert sum("= cohere_fx.decode_residual(" in line for line in after) == layers
    assert not any("cohere_fx.parallel_residual(" in line for line in after)
    linears = [line for line in after if "= cohere_fx.decode_linear(" in line]
    assert linears and not any("o_proj" in line or "down_proj" in line for line in linears)
    assert_compiled_step_equals_eager(args)


def test_ablated_or_without_its_inputs_nothing_is_fused():
    model = tiny_models()[0]
    names = [n for n in pass_names() if n != "decode_residual"]
    ablated, args = explain_decode_step(model, options={"passes": names})
    with torch.no_grad():
        no_residual = cohere_fx.explain(decode_step, *args, options={"passes": ["decode_linear", "decode_residual"]})
    assert ablated.matches["parallel_residual"] == 2 and ablated.matches["decode_residual"] == 0
    assert sum("= cohere_fx.parallel_residual(" in line for line in ablated.graphs[0].after.splitlines()) == 2
    assert no_residual.matches["decode_residual"] == 0  # the parallel residual it reads was never fused
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    training = cohere_fx.explain(model.train(), input_ids=ids, labels=ids, use_cache=False)
    assert training.matches["decode_residual"] == 0 and training.matches["parallel_residual"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
def test_cuda_command_r7b_shapes_are_bitwise_the_unfused_kernels(rows):
    """At Command-R7B's o and down shapes with the configs the step uses: the unfused decode_linear launches
    (both SINGLE_CONFIG, this kernel's config) and eager's residual sum."""
    torch.manual_seed(0)
    tensors = layer_tensors(rows, 4096, 4096, 14336, torch.bfloat16)
    assert torch.equal(op(*tensors), unfused(*tensors))
