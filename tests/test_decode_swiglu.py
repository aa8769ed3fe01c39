"""decode_swiglu: the kernel (under TRITON_INTERPRET=1 on CPU) bitwise against the two launches it replaces
(decode_linear over q, k, v, gate and up, then the SwiGLU kernel), the op against eager math, opcheck, and the
pattern on traced decode steps of Cohere and Cohere2 (one launch per layer before attention, the step still equal to
eager; nothing in training graphs)."""
import pytest
import torch
import torch.nn.functional as F

import cohere_fx
import cohere_fx.ops  # noqa: F401
from cohere_fx.kernels.decode_linear import decode_linear_fwd
from cohere_fx.kernels.swiglu import swiglu_fwd
from cohere_fx.passes.manager import pass_names
from cohere_fx.runtime.decode_runner import decode_step
from decode_steps import assert_compiled_step_equals_eager, explain_decode_step, tiny_models

op = torch.ops.cohere_fx.decode_swiglu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernel on a GPU, the interpreter in CI


def unfused(x, weights, config=None):
    """What the step ran before this fusion: one decode_linear launch over every weight, then the SwiGLU kernel."""
    *outs, gate, up = decode_linear_fwd(x, weights, config)
    return outs + [swiglu_fwd(gate, up)]


def projections(rows, k, sizes, intermediate, dtype, device=DEVICE):
    x = torch.randn(rows, k, dtype=dtype, device=device)
    weights = [torch.randn(n, k, dtype=dtype, device=device) * k ** -0.5 for n in (*sizes, intermediate, intermediate)]
    return x, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("sizes", [(40, 24, 24), (8,), ()], ids=["qkv", "one", "none"])
def test_kernel_is_bitwise_the_unfused_kernels(dtype, rows, sizes):
    """I = 40 and N = 40, 24, 8 are not multiples of BLOCK_N, K = 96 not of BLOCK_K: every mask is exercised;
    with fewer than three weights before gate and up, the slots between them are empty."""
    torch.manual_seed(0)
    x, weights = projections(rows, 96, sizes, 40, dtype)
    config = (16, 32, 4, 1, True)
    got = decode_linear_fwd(x, weights, config, swiglu=True)
    want = unfused(x, weights, config)
    assert [tuple(t.shape) for t in got] == [(rows, n) for n in (*sizes, 40)]
    for a, b in zip(got, want):
        assert a.dtype == dtype and torch.equal(a, b)
    gate, up = (x.double() @ w.double().t() for w in weights[-2:])
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got[-1].double(), F.silu(gate) * up, rtol=tol, atol=tol)


def test_kernel_refuses_what_it_cannot_run():
    x, weights = projections(4, 16, (8,), 12, torch.float32)
    with pytest.raises(ValueError, match="gate and up weights of one shape"):
        decode_linear_fwd(x, weights[:-1] + [weights[-1][:8].contiguous()], swiglu=True)
    with pytest.raises(ValueError, match="gate and up weights of one shape"):
        decode_linear_fwd(x, weights[:1], swiglu=True)


def test_op_keeps_leading_dims_falls_back_beyond_the_kernel_and_passes_opcheck():
    torch.manual_seed(0)
    x, weights = projections(6, 32, (16, 8, 8), 24, torch.float32)
    *plain, gate, up = weights

    def reference(x):
        return [F.linear(x, w) for w in plain] + [F.silu(F.linear(x, gate)) * F.linear(x, up)]

    for lead in ((2, 3), (3, 2, 1)):  # decode rows, and a leading shape the kernel takes as 6 rows
        args = (x.view(*lead, 32), plain, gate, up)
        got = op(*args)
        assert [tuple(t.shape) for t in got] == [(*lead, n) for n in (16, 8, 8, 24)]
        torch.testing.assert_close(got, reference(args[0]))
        torch.library.opcheck(op, args)
    wide = x.repeat(4, 1)  # 24 rows: a prefill, the torch reference
    torch.testing.assert_close(op(wide, plain, gate, up), reference(wide))
    with pytest.raises(ValueError, match="decode_swiglu"):
        op(x, plain, gate, up[:8])
    with pytest.raises(ValueError, match="decode_swiglu"):
        op(x, plain + plain, gate, up)


@pytest.mark.parametrize("index", [0, 1], ids=["cohere", "cohere2"])
def test_decode_step_has_one_projection_launch_per_layer_and_equals_eager(index):
    model = tiny_models()[index]
    report, args = explain_decode_step(model)
    layers = model.config.num_hidden_layers
    assert report.matches["decode_swiglu"] == layers
    (graph,) = report.graphs
    after = graph.after.splitlines()
    assert sum("= cohere_fx.decode_swiglu(" in line for line in after) == layers
    assert not any("= cohere_fx.swiglu(" in line for line in after)
    linears = [line for line in after if "= cohere_fx.decode_linear(" in line]
    assert linears and not any("gate_proj" in line or "q_proj" in line for line in linears)
    assert_compiled_step_equals_eager(args)


def test_ablated_or_without_its_inputs_nothing_is_fused():
    model = tiny_models()[0]
    names = [n for n in pass_names() if n != "decode_swiglu"]
    ablated, args = explain_decode_step(model, options={"passes": names})
    with torch.no_grad():
        no_swiglu = cohere_fx.explain(decode_step, *args, options={"passes": ["decode_linear", "decode_swiglu"]})
    assert ablated.matches["swiglu"] == 2 and ablated.matches["decode_swiglu"] == 0
    assert sum("= cohere_fx.swiglu(" in line for line in ablated.graphs[0].after.splitlines()) == 2
    assert no_swiglu.matches["decode_swiglu"] == 0  # the SwiGLU it reads was never fused
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    training = cohere_fx.explain(model.train(), input_ids=ids, labels=ids, use_cache=False)
    assert training.matches["decode_swiglu"] == 0 and training.matches["swiglu"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
def test_cuda_command_r7b_shapes_are_bitwise_the_unfused_kernels(rows):
    """At Command-R7B's q, k, v, gate and up shapes with the config the step uses."""
    torch.manual_seed(0)
    x, weights = projections(rows, 4096, (4096, 1024, 1024), 14336, torch.bfloat16)
    got = op(x, weights[:3], weights[3], weights[4])
    for a, b in zip(got, unfused(x, weights)):
        assert torch.equal(a, b)
