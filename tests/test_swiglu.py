"""``swiglu``: the Triton kernels against fp64, the op's registration, and the pattern in whole Cohere models.

On CPU the kernels run under Triton's interpreter (conftest); with a GPU the same small cases run compiled.
"""
import pytest
import torch
import torch.nn.functional as F
from parity import assert_training_parity, rel_err
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
import cohere_fx.ops  # registers torch.ops.cohere_fx.*
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from cohere_fx.kernels.elementwise import BLOCK
from cohere_fx.kernels.swiglu import swiglu_bwd, swiglu_fwd
from cohere_fx.ops.swiglu import swiglu_backward_reference, swiglu_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 1000), (2, 5, 700), (BLOCK + 1,), (7,)]  # none a multiple of BLOCK
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Norm-wise relative error against fp64: fp32 to rounding, low precision by one rounding of each output.
TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}
EAGER_RUN = {"inductor": False}


def make(shape, dtype, device=DEVICE):
    """gate over silu's curved range (both signs, a few large values); up and dout of both signs."""
    gate = 3 * torch.randn(shape, dtype=torch.float64)
    gate.view(-1)[::97] *= 10
    up, dout = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    return gate.to(dtype).to(device), up.to(dtype).to(device), dout.to(dtype).to(device)


def ref64(gate, up):
    return F.silu(gate.cpu().double()) * up.cpu().double()


def ref64_grads(dout, gate, up):
    g = gate.detach().cpu().double().requires_grad_()
    u = up.detach().cpu().double().requires_grad_()
    return torch.autograd.grad(ref64(g, u), (g, u), dout.cpu().double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward(shape, dtype):
    gate, up, _ = make(shape, dtype)
    out = swiglu_fwd(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out.cpu(), ref64(gate, up)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward(shape, dtype):
    gate, up, dout = make(shape, dtype)
    dgate, dup = swiglu_bwd(dout, gate, up)
    dgate_ref, dup_ref = ref64_grads(dout, gate, up)
    assert dgate.shape == dup.shape == gate.shape and dgate.dtype == dup.dtype == dtype
    assert rel_err(dgate.cpu(), dgate_ref) < TOL[dtype] and rel_err(dup.cpu(), dup_ref) < TOL[dtype]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(-g) = inf for g < -88: silu is -0
def test_bf16_rounds_once_where_eager_rounds_twice():
    """The op rounds the fp32 product once: it equals the correctly rounded fp64 result almost everywhere, and
    differs from eager (silu rounded to bf16, then the product rounded) by at most one bf16 step."""
    gate, up, _ = make((4, 3000), torch.bfloat16)
    out = swiglu_fwd(gate, up).cpu()
    assert (out == ref64(gate, up).to(torch.bfloat16)).float().mean() > 0.999
    eager = (F.silu(gate) * up).cpu()
    assert not torch.equal(out, eager)  # the double rounding shows at this size
    step = 2.0 ** -7 * eager.double().abs()  # one bf16 step is 2^-8..2^-7 of the value
    assert ((out.double() - eager.double()).abs() <= step).all()


def test_non_contiguous_inputs():
    gate, up, dout = make((6, 2 * 80), torch.float32)
    gate, up, dout = gate[:, ::2], up[:, 1::2], dout.t()[:80].t()
    out = swiglu_fwd(gate, up)
    dgate, dup = swiglu_bwd(dout, gate, up)
    dgate_ref, dup_ref = ref64_grads(dout, gate, up)
    assert rel_err(out.cpu(), ref64(gate, up)) < 1e-6
    assert rel_err(dgate.cpu(), dgate_ref) < 1e-6 and rel_err(dup.cpu(), dup_ref) < 1e-6


def test_empty():
    gate, up, dout = make((0, 64), torch.bfloat16)
    assert swiglu_fwd(gate, up).shape == (0, 64)
    assert all(g.shape == (0, 64) for g in swiglu_bwd(dout, gate, up))


def test_rejects_bad_inputs():
    gate, up, _ = make((2, 32), torch.float32)
    with pytest.raises(ValueError, match="inputs differ"):
        torch.ops.cohere_fx.swiglu(gate, up[:, :16])
    with pytest.raises(ValueError, match="inputs differ"):
        torch.ops.cohere_fx.swiglu(gate, up.to(torch.bfloat16))
    with pytest.raises(ValueError, match="not floating point"):
        torch.ops.cohere_fx.swiglu(gate.long(), up.long())
    with pytest.raises(ValueError, match="not one of"):
        swiglu_fwd(gate.double(), up.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    gate, up, dout = make((3, 5, 48), dtype)
    torch.library.opcheck(torch.ops.cohere_fx.swiglu.default, (gate.requires_grad_(), up.requires_grad_()))
    torch.library.opcheck(torch.ops.cohere_fx.swiglu_backward.default, (dout, gate.detach(), up.detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_through_op(dtype):
    gate, up, dout = make((3, 5, 96), dtype)
    gate.requires_grad_()
    up.requires_grad_()
    out = torch.ops.cohere_fx.swiglu(gate, up)
    dgate, dup = torch.autograd.grad(out, (gate, up), dout)
    dgate_ref, dup_ref = ref64_grads(dout, gate, up)
    assert rel_err(out.cpu(), ref64(gate.detach(), up.detach())) < TOL[dtype]
    assert rel_err(dgate.cpu(), dgate_ref) < TOL[dtype] and rel_err(dup.cpu(), dup_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_torch_reference_matches_fp64(dtype):
    """The op's non-Triton path (devices Triton cannot run on, and float64) agrees with the fp64 reference."""
    gate, up, dout = make((7, 200), dtype, device="cpu")
    dgate, dup = swiglu_backward_reference(dout, gate, up)
    dgate_ref, dup_ref = ref64_grads(dout, gate, up)
    tol = TOL.get(dtype, 1e-12)
    assert rel_err(swiglu_reference(gate, up), ref64(gate, up)) < tol
    assert rel_err(dgate, dgate_ref) < tol and rel_err(dup, dup_ref) < tol


MODELS = {
    "cohere": lambda **kw: CohereForCausalLM(tiny_cohere_config(layers=2, **kw)),
    "cohere2": lambda **kw: Cohere2ForCausalLM(tiny_cohere2_config(layers=4, **kw)),
}


@pytest.mark.parametrize("hidden_act", ["silu", "swish"])  # HF's SiLUActivation and nn.SiLU: two spellings
@pytest.mark.parametrize("arch", MODELS)
def test_one_match_per_layer(arch, hidden_act):
    model = MODELS[arch](hidden_act=hidden_act)
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, labels=ids)
    layers = model.config.num_hidden_layers
    assert report.matches["swiglu"] == layers and not report.near_misses["swiglu"]
    assert report.graphs[0].after.count("= cohere_fx.swiglu(") == layers
    assert "silu" not in report.graphs[0].after


@pytest.mark.parametrize("arch", MODELS)
def test_training_parity_with_all_patterns(arch):
    model = MODELS[arch]()
    ids = torch.randint(3, 128, (2, 12))
    assert_training_parity(model, ids, EAGER_RUN, tol=1e-5)


def test_gelu_model_is_not_matched():
    model = CohereForCausalLM(tiny_cohere_config(layers=2, hidden_act="gelu"))
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches["swiglu"] == 0 and report.matches["layer_norm"] == 3
    assert_training_parity(model, ids, EAGER_RUN, tol=1e-5)


class ScaledSiluMLP(torch.nn.Module):
    """silu(gate) times a per-channel parameter instead of up_proj(x): same call, broadcast operand."""

    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = torch.nn.Linear(intermediate, hidden, bias=False)
        self.scale = torch.nn.Parameter(1 + 0.1 * torch.randn(intermediate))

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.scale)


def test_broadcast_multiplier_is_a_near_miss():
    model = CohereForCausalLM(tiny_cohere_config(layers=2))
    model.model.layers[1].mlp = ScaledSiluMLP(model.config.hidden_size, model.config.intermediate_size)
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches["swiglu"] == 1
    (miss,) = report.near_misses["swiglu"]
    assert "differ in shape" in miss
    assert_training_parity(model, ids, EAGER_RUN, tol=1e-5)


@pytest.mark.gpu
def test_cuda_r7b_shape_bf16():
    gate, up, dout = make((4096, 14336), torch.bfloat16, device="cuda")
    out = swiglu_fwd(gate, up)
    dgate, dup = swiglu_bwd(dout, gate, up)
    dgate_ref, dup_ref = ref64_grads(dout, gate, up)
    assert rel_err(out.cpu(), ref64(gate, up)) < TOL[torch.bfloat16]
    assert rel_err(dgate.cpu(), dgate_ref) < TOL[torch.bfloat16]
    assert rel_err(dup.cpu(), dup_ref) < TOL[torch.bfloat16]
