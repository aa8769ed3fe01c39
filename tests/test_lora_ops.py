"""lora_shrink / lora_expand: the kernels (under TRITON_INTERPRET=1 on CPU) and the ops against PEFT's own fp32-adapter
math and fp64, forward and backward; opcheck; the patterns on PEFT LoRA models over bf16 (no fp32 copy of an
activation left in the traced graph), and on models they must leave alone."""
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import CohereForCausalLM

import cohere_fx
import cohere_fx.ops  # noqa: F401
from cohere_fx.configs import tiny_cohere_config
from cohere_fx.kernels.lora import lora_expand_bwd, lora_expand_fwd, lora_shrink_bwd, lora_shrink_fwd
from parity import rel_err

ops = torch.ops.cohere_fx
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_layer(x, a, b, base, scaling, round_update=False):
    """PEFT's LoRA Linear (round_update: its bitsandbytes Linear4bit) on fp32 adapters, as written there."""
    update = F.linear(F.linear(x.to(a.dtype), a), b) * scaling
    return base + update.to(base.dtype) if round_update else (base + update).to(base.dtype)


def fused_layer(x, a, b, base, scaling, round_update=False):
    return ops.lora_expand(base, ops.lora_shrink(x, a), b, scaling, round_update)


def layer_inputs(m, k, r, n, dtype=torch.bfloat16, device=DEVICE):
    rand = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    return (rand(m, k).to(dtype).requires_grad_(), (rand(r, k) / k ** 0.5).requires_grad_(),
            (rand(n, r) / r ** 0.5).requires_grad_(), rand(m, n).to(dtype).requires_grad_())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("round_update", [False, True], ids=["linear", "linear4bit"])
@pytest.mark.parametrize("shape", [(70, 96, 4, 40), (33, 48, 80, 130)], ids=["r4", "r80"])
def test_ops_equal_peft_forward_and_backward(dtype, round_update, shape):
    """Outputs and every gradient: the fp32 ones (A's, B's) to fp32 accumulation-order level, the low-precision
    ones (the output, x's and the base's) within one rounding of PEFT's (same fp32 value up to reassociation)."""
    torch.manual_seed(shape[2])
    assert_matches_peft(layer_inputs(*shape, dtype=dtype), 0.75, round_update)


def assert_matches_peft(inputs, scaling, round_update):
    x, dtype = inputs[0], inputs[0].dtype
    dy = torch.randn(x.shape[0], inputs[2].shape[0], device=x.device).to(dtype)
    results = []
    for fn in (peft_layer, fused_layer):
        y = fn(*inputs, scaling, round_update)
        results.append((y, *torch.autograd.grad(y, inputs, dy)))
    (y_ref, *grads_ref), (y, *grads) = results
    ulp = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    for got, want in ((y, y_ref), (grads[0], grads_ref[0]), (grads[3], grads_ref[3])):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=2 * ulp * want.abs().max().item())
    for got, want in ((grads[1], grads_ref[1]), (grads[2], grads_ref[2])):
        assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [16, 80])
def test_cuda_r7b_gate_proj_shapes(rank):
    """The compiled kernels (tf32 tensor-core dots on split fp32 operands, tf32x3 dots) at r7b's gate_proj shapes, 4096
    tokens; rank 80 is lora_shared_input's five rank-16 A matrices."""
    torch.manual_seed(rank)
    assert_matches_peft(layer_inputs(4096, 4096, rank, 14336, device="cuda"), 1.0, False)


def test_kernels_against_fp64():
    """The kernels alone on sizes that fill no tile evenly, against fp64 math on the same inputs."""
    torch.manual_seed(0)
    m, k, r, n = 100, 96, 20, 72
    x, a, b, base = (t.detach() for t in layer_inputs(m, k, r, n))
    h = lora_shrink_fwd(x, a)
    x64, a64, b64 = x.double(), a.double(), b.double()
    assert rel_err(h, x64 @ a64.t()) < 1e-6
    dh, dy = torch.randn(m, r, device=DEVICE), torch.randn(m, n, device=DEVICE).bfloat16()
    dx, da = lora_shrink_bwd(dh, x, a)
    assert rel_err(dx, dh.double() @ a64) < 2 ** -8 and rel_err(da, dh.double().t() @ x64) < 1e-6
    out = lora_expand_fwd(base, h, b, 0.5, False)
    assert rel_err(out, base.double() + (h.double() @ b64.t()) * 0.5) < 2 ** -8
    g = dy.double() * 0.5
    dh2, db = lora_expand_bwd(dy, h, b, 0.5)
    assert rel_err(dh2, g @ b64) < 1e-6 and rel_err(db, g.t() @ h.double()) < 1e-6


@pytest.mark.parametrize("r", [16, 40], ids=["one-pass", "two-pass"])
def test_expand_backward_across_partitions(r):
    """lora_expand's backward where the tokens are cut into partitions and the output features into several column
    blocks (rank 16: one pass over dy for both gradients; rank 40 pads past FUSED_BWD_MAX_RANK: two passes)."""
    torch.manual_seed(r)
    m, n = 600, 520
    h, b = torch.randn(m, r, device=DEVICE), torch.randn(n, r, device=DEVICE)
    dy = torch.randn(m, n, device=DEVICE).bfloat16()
    dh, db = lora_expand_bwd(dy, h, b, 0.75)
    g = dy.double() * 0.75
    assert rel_err(dh, g @ b.double()) < 1e-6 and rel_err(db, g.t() @ h.double()) < 1e-6


@pytest.mark.parametrize("r", [16, 80])
def test_shrink_backward_across_column_chunks(r):
    """lora_shrink's backward where each program walks several column tiles of A and the columns are cut into
    chunks, the last one ragged (600 columns)."""
    torch.manual_seed(r)
    m, k = 64, 600
    x, a = torch.randn(m, k, device=DEVICE).bfloat16(), torch.randn(r, k, device=DEVICE) / k ** 0.5
    dh = torch.randn(m, r, device=DEVICE)
    dx, da = lora_shrink_bwd(dh, x, a)
    want = dh.double() @ a.double()
    torch.testing.assert_close(dx.double(), want.bfloat16().double(), rtol=2 ** -8, atol=2 ** -8 * want.abs().max())
    assert rel_err(da, dh.double().t() @ x.double()) < 1e-6


def assert_fp32_dots_round_the_exact_products(m, k, r, device):
    """The fp32 x fp32 products (x's gradient dh @ A, lora_expand's h @ B.T) are the fp64 ones rounded once to bf16,
    bar the elements whose fp32 sums fall on the other side of a rounding boundary: the dots' products must be
    exact (a dropped part of the split leaves 2^-16 of a product and moves about one element in a hundred)."""
    torch.manual_seed(m + r)
    x, a = torch.randn(m, k, device=device).bfloat16(), torch.randn(r, k, device=device) / k ** 0.5
    dh, base = torch.randn(m, r, device=device), torch.zeros(m, k, device=device).bfloat16()
    dx = lora_shrink_bwd(dh, x, a)[0]
    out = lora_expand_fwd(base, dh, a.t().contiguous(), 1.0, False)
    for got in (dx, out):
        assert (got == (dh.double() @ a.double()).bfloat16()).double().mean().item() > 0.9995


@pytest.mark.parametrize("r", [16, 80])
def test_fp32_dots_round_the_exact_products(r):
    assert_fp32_dots_round_the_exact_products(128, 512, r, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 80])
def test_cuda_fp32_dots_round_the_exact_products(r):
    """The same at r7b's widths on a GPU (bf16 tensor-core dots of the split parts)."""
    assert_fp32_dots_round_the_exact_products(4096, 4096, r, "cuda")


def test_opcheck_and_refusals():
    x, a, b, base = (t.detach() for t in layer_inputs(8, 32, 4, 24))
    torch.library.opcheck(ops.lora_shrink, (x.requires_grad_(), a.requires_grad_()))
    h = ops.lora_shrink(x, a).detach()
    torch.library.opcheck(ops.lora_expand, (base.requires_grad_(), h.requires_grad_(), b.requires_grad_(), 2.0, False))
    with pytest.raises(ValueError, match="fp32"):
        ops.lora_shrink(x, a.bfloat16())
    with pytest.raises(ValueError, match="rank"):
        ops.lora_shrink(x, torch.randn(129, 32, device=DEVICE))
    with pytest.raises(ValueError, match="B"):
        ops.lora_expand(base, h, b.t().contiguous(), 2.0, False)


def lora_model(dtype=torch.bfloat16, dropout=0.0, layers=2, rank=4, targets=TARGETS):
    torch.manual_seed(0)
    model = CohereForCausalLM(tiny_cohere_config(layers=layers)).to(dtype)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights=False)
    return get_peft_model(model, config).train()


def lora_grads(model, ids, passes=None):
    run = model if passes is False else torch.compile(model, backend="cohere_fx",
                                                      options={"inductor": False, "passes": passes})
    model.zero_grad(set_to_none=True)
    run(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_lora_model_uses_the_ops_and_keeps_its_gradients():
    """Every LoRA'd linear: q/k/v/gate/up share one lora_shrink per layer (lora_shared_input), o and down have
    their own; seven lora_expand per layer; no fp32 copy of an activation left in the graph. Gradients as without
    the two patterns (the rest of the pipeline the same), within bf16 rounding."""
    model = lora_model()
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, labels=ids)
    layers = 2
    assert report.matches["lora_shrink"] == 3 * layers and report.matches["lora_expand"] == 7 * layers
    assert not report.near_misses["lora_shrink"] and not report.near_misses["lora_expand"]
    (graph,) = report.graphs
    assert ".to(torch.float32)" not in graph.after.split("cos_2")[-1]  # past the rotary module's own casts
    everything = lora_grads(model, ids)
    without = lora_grads(model, ids, [p for p in cohere_fx.patterns.PATTERNS if p not in ("lora_shrink", "lora_expand")])
    worst = max(everything, key=lambda n: rel_err(everything[n], without[n]))
    assert rel_err(everything[worst], without[worst]) < 1e-2, (worst, rel_err(everything[worst], without[worst]))


def test_left_alone_where_not_exact_or_not_lora():
    """fp32 models (no cast: nothing to save) and dropout > 0 (the cast feeds a dropout) keep PEFT's path."""
    ids = torch.randint(3, 128, (2, 8))
    fp32 = cohere_fx.explain(lora_model(torch.float32), ids, labels=ids)
    assert fp32.matches["lora_shrink"] == fp32.matches["lora_expand"] == 0
    dropout = cohere_fx.explain(lora_model(dropout=0.1), ids, labels=ids)
    assert dropout.matches["lora_shrink"] == 0 and dropout.matches["lora_expand"] == 7 * 2
    plain = cohere_fx.explain(CohereForCausalLM(tiny_cohere_config(layers=2)).to(torch.bfloat16), ids, labels=ids)
    assert plain.matches["lora_shrink"] == plain.matches["lora_expand"] == 0


def saved_for_backward(model, ids):
    """(dtype, shape) of every tensor the forward saves for the backward, as inductor's partitioner chooses them
    (min-cut, which honours the recompute marks), after the cohere_fx passes; nothing is run."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from cohere_fx.passes import CohereFxPasses

    saved = []

    class Partitioned(Exception):
        pass

    def forward_compiler(gm, _):
        (output,) = gm.graph.find_nodes(op="output")
        values = [n.meta.get("val") for n in output.args[0] if isinstance(n, torch.fx.Node)]
        saved.extend((v.dtype, tuple(v.shape)) for v in values if isinstance(v, torch.Tensor))
        raise Partitioned

    def backend(gm, example_inputs):
        CohereFxPasses().run(gm)
        return aot_autograd(fw_compiler=forward_compiler, partition_fn=min_cut_rematerialization_partition)(
            gm, example_inputs)

    with pytest.raises(Exception, match="Partitioned"):
        torch.compile(model, backend=backend)(input_ids=ids, labels=ids)
    return saved


def test_backward_keeps_no_fp32_activation_and_recomputes_lora_inputs():
    """What PEFT's path keeps: fp32 copies of the norm output, the attention output and the SwiGLU output. What the
    LoRA ops keep: none of those, and no SwiGLU output either (swiglu_lora_shrink's backward recomputes it from gate
    and up, which stay), nor the norm output (recomputed from its input: a mark that the rewritten graph's text
    shows)."""
    model, ids = lora_model(), torch.randint(3, 128, (2, 8))
    tokens, hidden, ffn = ids.numel(), model.config.hidden_size, model.config.intermediate_size
    activations = [(dtype, shape) for dtype, shape in saved_for_backward(model, ids)
                   if len(shape) >= 2 and shape[-1] >= hidden and torch.Size(shape).numel() // shape[-1] == tokens]
    assert not [a for a in activations if a[0] == torch.float32], activations
    assert sum(shape[-1] == ffn for _, shape in activations) == 2 * 2, activations  # gate and up per layer
    after = str(cohere_fx.explain(model, ids, labels=ids))
    assert after.count("= cohere_fx.swiglu_lora_shrink(lora_expand") == 2
    norms = [line for line in after.splitlines() if "= cohere_fx.layer_norm(" in line and "input_layernorm" in line]
    assert len(norms) == 2 and all("# recomputed in backward" in line for line in norms)


@pytest.mark.slow
def test_inductor_training_step_with_recompute_marks():
    """The whole pipeline through inductor (min-cut partitioner, the recompute marks, the ops as fallbacks): loss
    and LoRA gradients as eager's up to bf16 rounding, the same gradients on a second step."""
    model, ids = lora_model(layers=1), torch.randint(3, 128, (2, 8))
    eager = lora_grads(model, ids, passes=False)
    compiled = torch.compile(model, backend="cohere_fx", options={"return_logits": False})

    def step():
        model.zero_grad(set_to_none=True)
        compiled(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    first, second = step(), step()
    worst = max(eager, key=lambda n: rel_err(first[n], eager[n]))
    assert rel_err(first[worst], eager[worst]) < 3e-2, (worst, rel_err(first[worst], eager[worst]))
    assert all(torch.equal(first[n], second[n]) for n in first)
