"""decode_linear: the kernel (under TRITON_INTERPRET=1 on CPU) and the op against F.linear, opcheck, and the pattern
on a traced decode step (one launch per layer for q, k, v, gate and up; the head alone when it is large; nothing
in training graphs or on prefill-sized inputs)."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import CohereForCausalLM

import cohere_fx
import cohere_fx.ops  # noqa: F401
from cohere_fx.configs import tiny_cohere_config
from cohere_fx.kernels.decode_linear import decode_linear_fwd
from cohere_fx.passes import pass_names
from decode_steps import assert_compiled_step_equals_eager, decode_step_args, explain_decode_step, tiny_models

op = torch.ops.cohere_fx.decode_linear
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernel on a GPU, the interpreter in CI


def one_ulp_close(out, ref):
    """Within one unit in the last place of out's dtype (the accumulation order differs)."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_kernel_equals_linear_for_every_weight_slot(dtype, rows):
    torch.manual_seed(0)
    x = torch.randn(rows, 96, dtype=dtype, device=DEVICE)
    weights = [torch.randn(n, 96, dtype=dtype, device=DEVICE) for n in (40, 16, 8, 64, 33)]  # all five slots
    for count, upcast in itertools.product((1, 2, 5), (True, False) if DEVICE == "cuda" else (True,)):
        outs = decode_linear_fwd(x, weights[:count], config=(16, 32, 4, 1, upcast))
        assert len(outs) == count
        for out, w in zip(outs, weights):
            one_ulp_close(out, x.float() @ w.float().t())


def test_kernel_refuses_what_it_cannot_run():
    x, w = torch.randn(17, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="M <= 16"):
        decode_linear_fwd(x, [w])
    with pytest.raises(ValueError, match="row-major"):
        decode_linear_fwd(x[:4], [w.t().contiguous().t()])
    with pytest.raises(ValueError, match="1-5 weights"):
        decode_linear_fwd(x[:4], [w] * 6)


def test_op_keeps_leading_dims_and_falls_back_beyond_the_kernel():
    torch.manual_seed(0)
    weights = [torch.randn(24, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE)]
    for x in (torch.randn(2, 1, 32, device=DEVICE), torch.randn(3, 40, 32, device=DEVICE)):  # decode; prefill rows
        outs = op(x, weights)
        for out, w in zip(outs, weights):
            assert out.shape == (*x.shape[:-1], w.shape[0])
            torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(op, (torch.randn(2, 1, 32, device=DEVICE), weights))
    with pytest.raises(ValueError, match="weights"):
        op(torch.randn(1, 32, device=DEVICE), [torch.randn(8, 16, device=DEVICE)])


def tiny_model():
    return tiny_models()[0]


def test_decode_step_fuses_one_launch_per_layer_and_takes_every_linear():
    """Per layer one launch for q, k, v, gate and up, one each for o and down; one for the head (decode_residual,
    which takes o and down further, left out)."""
    model = tiny_model()
    report, _ = explain_decode_step(model, options={"passes": [n for n in pass_names() if n != "decode_residual"]})
    c = model.config
    assert report.matches["decode_linear"] == 3 * c.num_hidden_layers + 1
    (graph,) = report.graphs
    calls = [line for line in graph.after.splitlines() if "= cohere_fx.decode_linear(" in line]
    head_dim = c.hidden_size // c.num_attention_heads
    q, kv, ffn, h = c.hidden_size, c.num_key_value_heads * head_dim, c.intermediate_size, c.hidden_size
    grouped = f"(f32[2, 1, {q}], f32[2, 1, {kv}], f32[2, 1, {kv}], f32[2, 1, {ffn}], f32[2, 1, {ffn}])"
    singles = [f"(f32[2, 1, {h}])", f"(f32[2, 1, {c.vocab_size}])"]  # o and down; the head
    assert sum(grouped in line for line in calls) == c.num_hidden_layers, calls
    assert sum(any(s in line for s in singles) for line in calls) == 2 * c.num_hidden_layers + 1, calls
    assert not any("linear" in line for line in graph.after.splitlines() if "decode_linear" not in line)


def test_rewritten_decode_step_equals_eager():
    assert_compiled_step_equals_eager(decode_step_args(tiny_model()), passes=["decode_linear"])


def test_not_applied_with_gradients_or_many_rows():
    model = tiny_model().train()
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    report = cohere_fx.explain(model, input_ids=ids, labels=ids, use_cache=False)  # training graph
    assert report.matches["decode_linear"] == 0
    with torch.no_grad():  # inference, but 2 x 20 rows: a prefill
        ids = torch.randint(0, model.config.vocab_size, (2, 20))
        assert cohere_fx.explain(model.eval(), input_ids=ids, use_cache=False).matches["decode_linear"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
def test_cuda_command_r7b_shapes_equal_cublas(rows):
    """The compiled kernel at Command-R7B's decode shapes (the five projections of one layer, o, down and the
    head: each config of kernels/decode_linear.py): every output within one bf16 rounding of cuBLAS's."""
    torch.manual_seed(0)
    for sizes, k in (((4096, 1024, 1024, 14336, 14336), 4096), ((4096,), 4096), ((4096,), 14336), ((256000,), 4096)):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for n in sizes]
        for out, w in zip(op(x, weights), weights):
            ref = (x.float() @ w.float().t())
            torch.testing.assert_close(out.float(), ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())


def test_not_applied_to_frozen_layers_of_a_training_graph():
    """Under LoRA the base linears are frozen and their outputs need no gradient, on 16 rows here: still a
    training graph (its loss requires grad), not a decode step."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(CohereForCausalLM(tiny_cohere_config(layers=2)),
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ids = torch.randint(3, 128, (2, 8))
    assert cohere_fx.explain(model, ids, labels=ids).matches["decode_linear"] == 0
