"""``parallel_residual``: the kernel is bitwise eager's ``residual + attn + mlp``, the op's registration, and the
pattern in whole Cohere models (one match per layer, also under LoRA and gradient checkpointing).
"""
import copy

import pytest
import torch
from parity import assert_training_parity, rel_err, train_step
from peft import LoraConfig, get_peft_model
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
import cohere_fx.ops  # registers torch.ops.cohere_fx.*
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from cohere_fx.kernels.elementwise import BLOCK
from cohere_fx.kernels.parallel_residual import parallel_residual_fwd
from cohere_fx.ops.parallel_residual import parallel_residual_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 1000), (2, 5, 700), (BLOCK + 1,), (7,)]  # none a multiple of BLOCK
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}
EAGER_RUN = {"inductor": False}


def make(shape, dtype, device=DEVICE):
    """A residual stream larger than the two updates, as in a deep model: the roundings of the two adds matter."""
    residual = 8 * torch.randn(shape, dtype=torch.float64)
    attn, mlp = torch.randn(shape, dtype=torch.float64), 0.3 * torch.randn(shape, dtype=torch.float64)
    return tuple(t.to(dtype).to(device) for t in (residual, attn, mlp))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bitwise_eager(shape, dtype):
    residual, attn, mlp = make(shape, dtype)
    out = parallel_residual_fwd(residual, attn, mlp)
    assert out.shape == residual.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, residual + attn + mlp)
    expected = residual.double() + attn.double() + mlp.double()
    assert rel_err(out.cpu(), expected.cpu()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_order_matters(dtype):
    """One rounding of the fp32 sum is not eager's result: the kernel's intermediate rounding is needed."""
    residual, attn, mlp = make((4, 3000), dtype)
    once = (residual.float() + attn.float() + mlp.float()).to(dtype)
    assert not torch.equal(once, residual + attn + mlp)
    assert torch.equal(parallel_residual_fwd(residual, attn, mlp), residual + attn + mlp)


def test_non_contiguous_inputs():
    residual, attn, mlp = make((6, 2 * 80), torch.bfloat16)
    residual, attn, mlp = residual[:, ::2], attn[:, 1::2], mlp.t()[:80].t()
    assert torch.equal(parallel_residual_fwd(residual, attn, mlp), residual + attn + mlp)


def test_empty():
    assert parallel_residual_fwd(*make((0, 64), torch.bfloat16)).shape == (0, 64)


def test_rejects_bad_inputs():
    residual, attn, mlp = make((2, 32), torch.float32)
    with pytest.raises(ValueError, match="inputs differ"):
        torch.ops.cohere_fx.parallel_residual(residual, attn[:1], mlp)
    with pytest.raises(ValueError, match="inputs differ"):
        torch.ops.cohere_fx.parallel_residual(residual, attn, mlp.to(torch.bfloat16))
    with pytest.raises(ValueError, match="not one of"):
        parallel_residual_fwd(residual.double(), attn.double(), mlp.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    inputs = [t.requires_grad_() for t in make((3, 5, 48), dtype)]
    torch.library.opcheck(torch.ops.cohere_fx.parallel_residual.default, tuple(inputs))


def test_gradient_is_the_output_gradient_for_every_term():
    inputs = [t.requires_grad_() for t in make((3, 5, 96), torch.bfloat16)]
    grad = torch.randn(3, 5, 96, dtype=torch.bfloat16, device=DEVICE)
    grads = torch.autograd.grad(torch.ops.cohere_fx.parallel_residual(*inputs), inputs, grad)
    assert all(torch.equal(g, grad) for g in grads)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_torch_reference_is_eager(dtype):
    residual, attn, mlp = make((7, 200), dtype, device="cpu")
    assert torch.equal(parallel_residual_reference(residual, attn, mlp), residual + attn + mlp)


MODELS = {
    "cohere": lambda: CohereForCausalLM(tiny_cohere_config(layers=2)),
    "cohere2": lambda: Cohere2ForCausalLM(tiny_cohere2_config(layers=4)),
}


@pytest.mark.parametrize("arch", MODELS)
def test_one_match_per_layer(arch):
    model = MODELS[arch]()
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, labels=ids)
    layers = model.config.num_hidden_layers
    assert report.matches["parallel_residual"] == layers and not report.near_misses["parallel_residual"]
    assert report.graphs[0].after.count("= cohere_fx.parallel_residual(") == layers


def test_matches_under_lora_and_gradient_checkpointing():
    """o_proj and down_proj end in PEFT's ``base + lora`` add, and each layer may be a checkpoint subgraph: the
    residual is still found in every layer."""
    ids = torch.randint(3, 128, (2, 8))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"], init_lora_weights=False)
    lora = get_peft_model(MODELS["cohere"](), config)
    assert cohere_fx.explain(lora, ids, labels=ids).matches["parallel_residual"] == 2
    checkpointed = MODELS["cohere2"]()
    checkpointed.gradient_checkpointing_enable()
    assert cohere_fx.explain(checkpointed.train(), ids, labels=ids).matches["parallel_residual"] == 4


@pytest.mark.parametrize("arch", MODELS)
def test_bf16_training_is_bitwise_unchanged_by_the_fusion(arch):
    """bf16 logits, loss and every gradient are identical with and without the fusion (both through the same
    backend otherwise): the op computes eager's sum bit for bit and passes the gradient through unchanged."""
    model = MODELS[arch]().to(torch.bfloat16)
    ids = torch.randint(3, 128, (2, 12))
    runs = []
    for passes in ([], ["parallel_residual"]):
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="cohere_fx", options={**EAGER_RUN, "passes": passes})
        runs.append(train_step(compiled, ids))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = runs
    assert torch.equal(logits_a, logits_b) and torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    report = cohere_fx.explain(model, ids, labels=ids, options={"passes": ["parallel_residual"]})
    assert report.matches["parallel_residual"] == model.config.num_hidden_layers


def test_bf16_training_parity_with_all_patterns():
    model = MODELS["cohere2"]().to(torch.bfloat16)
    ids = torch.randint(3, 128, (2, 12))
    assert_training_parity(model, ids, EAGER_RUN, tol=2e-2)


class SumOfProjectionsMLP(torch.nn.Module):
    """An MLP whose output is a three-term sum of same-shaped tensors: the pattern's shape, not the residual."""

    def __init__(self, hidden):
        super().__init__()
        self.a = torch.nn.Linear(hidden, hidden, bias=False)
        self.b = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        return x + self.a(x) + self.b(x)


def test_three_term_sum_outside_the_decoder_layer_is_a_near_miss():
    model = CohereForCausalLM(tiny_cohere_config(layers=2))
    model.model.layers[0].mlp = SumOfProjectionsMLP(model.config.hidden_size)
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches["parallel_residual"] == 2
    (miss,) = report.near_misses["parallel_residual"]
    assert "SumOfProjectionsMLP" in miss and "not directly in a Cohere decoder layer" in miss
    assert_training_parity(model, ids, EAGER_RUN, tol=1e-5)


@pytest.mark.gpu
def test_cuda_r7b_shape_bf16():
    residual, attn, mlp = make((4096, 4096), torch.bfloat16, device="cuda")
    assert torch.equal(parallel_residual_fwd(residual, attn, mlp), residual + attn + mlp)
