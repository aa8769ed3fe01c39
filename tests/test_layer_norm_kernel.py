"""The Triton LayerNorm kernels (fwd + bwd) and the ``cohere_fx::layer_norm`` op against an fp64 reference.

On CPU the kernels run under Triton's interpreter (conftest); with a GPU the same small cases run compiled on
CUDA, and the ``gpu`` test adds the real [8192, 4096] bf16 shape.
"""
import pytest
import torch

import cohere_fx.ops  # noqa: F401  (registers torch.ops.cohere_fx.*)
from cohere_fx.kernels import persistent_programs
from cohere_fx.kernels.layer_norm import MAX_N, layer_norm_bwd, layer_norm_fwd
from cohere_fx.ops.layer_norm import layer_norm_backward_reference, layer_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 5, 96), (7, 200), (4, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative (norm-wise) error allowed; low-precision outputs are bounded by their own rounding.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def ref64(x, weight, eps):
    """CohereLayerNorm in fp64: two-pass variance, weight only."""
    h = x.double()
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    return weight.double() * ((h - mean) * torch.rsqrt(var + eps))


def ref64_grads(dy, x, weight, eps):
    x64 = x.detach().cpu().double().requires_grad_()
    w64 = weight.detach().cpu().double().requires_grad_()
    return torch.autograd.grad(ref64(x64, w64, eps), (x64, w64), dy.cpu().double())


def rel_err(actual, expected):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).norm() / expected.norm()).item()


def make(shape, dtype, weight_dtype=None, device=DEVICE):
    """Rows with an offset (two-pass variance matters) and a variance near 0.1 (so eps = 0.1 matters)."""
    x = (3.0 + 0.3 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    weight = (1.0 + 0.5 * torch.randn(shape[-1], dtype=torch.float64)).to(weight_dtype or dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    return x.to(device), weight.to(device), dy.to(device)


@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward(shape, dtype, eps):
    x, weight, _ = make(shape, dtype)
    y = layer_norm_fwd(x, weight, eps)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert rel_err(y, ref64(x.cpu(), weight.cpu(), eps)) < TOL[dtype]


@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward(shape, dtype, eps):
    x, weight, dy = make(shape, dtype)
    dx, dw = layer_norm_bwd(dy, x, weight, eps)
    dx_ref, dw_ref = ref64_grads(dy, x, weight, eps)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert dw.shape == weight.shape and dw.dtype == weight.dtype
    assert rel_err(dx, dx_ref) < TOL[dtype]
    assert rel_err(dw, dw_ref) < TOL[dtype]


def test_eps_is_used():
    x, weight, dy = make((4, 64), torch.float32)
    y = layer_norm_fwd(x, weight, 0.1)
    dx, _ = layer_norm_bwd(dy, x, weight, 0.1)
    # Row variance is ~0.09: eps = 0.1 against 1e-5 changes the result by tens of percent.
    assert rel_err(y, ref64(x.cpu(), weight.cpu(), 1e-5)) > 0.1
    assert rel_err(dx, ref64_grads(dy, x, weight, 1e-5)[0]) > 0.1


@pytest.mark.parametrize("n", [3, 48])
def test_dw_sums_over_programs(n):
    """Several rows per backward program, the last block shorter: every row lands in dw exactly once."""
    rows = 3 * persistent_programs(torch.empty(0, device=DEVICE)) + 2
    x, weight, dy = make((rows, n), torch.float32)
    dx, dw = layer_norm_bwd(dy, x, weight, 1e-5)
    dx_ref, dw_ref = ref64_grads(dy, x, weight, 1e-5)
    # at N = 3 dx is a difference of nearly equal terms: GPU FMAs leave ~2e-5 there
    assert rel_err(dx, dx_ref) < 1e-4 and rel_err(dw, dw_ref) < 1e-5


def test_single_column():
    """N = 1: x - mean is exactly 0, so y and dw are exactly 0. dx = rstd * (g - mean(g)) is 0 up to the
    rounding residue a GPU's fused multiply-add leaves in g - mean(g) (~1 ulp of g, times rstd)."""
    x, weight, dy = make((5, 1), torch.float32)
    dx, dw = layer_norm_bwd(dy, x, weight, 1e-5)
    assert not layer_norm_fwd(x, weight, 1e-5).any() and not dw.any()
    assert dx.abs().max() <= 4 * torch.finfo(torch.float32).eps * (dy * weight).abs().max() * 1e-5 ** -0.5


def test_mixed_dtypes():
    """bf16 activations with an fp32 weight: y and dx in bf16, dw in fp32."""
    x, weight, dy = make((7, 200), torch.bfloat16, weight_dtype=torch.float32)
    y = layer_norm_fwd(x, weight, 1e-5)
    dx, dw = layer_norm_bwd(dy, x, weight, 1e-5)
    dx_ref, dw_ref = ref64_grads(dy, x, weight, 1e-5)
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert rel_err(y, ref64(x.cpu(), weight.cpu(), 1e-5)) < 1e-2
    assert rel_err(dx, dx_ref) < 1e-2
    assert rel_err(dw, dw_ref) < 1e-4  # dy and x are exact bf16 values; the sum runs in fp32


@pytest.mark.parametrize("layout", ["row_stride", "col_stride"])
def test_non_contiguous(layout):
    x, weight, dy = make((6, 2 * 80), torch.float32)
    if layout == "row_stride":  # a view with row stride 160
        x, dy = x[:, :80], dy[:, 80:]
    else:  # unit column stride lost: the launcher copies
        x, dy = x[:, ::2], dy[:, 1::2]
    y = layer_norm_fwd(x, weight[:80], 1e-5)
    dx, dw = layer_norm_bwd(dy, x, weight[:80], 1e-5)
    dx_ref, dw_ref = ref64_grads(dy, x, weight[:80], 1e-5)
    assert rel_err(y, ref64(x.cpu(), weight[:80].cpu(), 1e-5)) < 1e-5
    assert rel_err(dx, dx_ref) < 1e-5 and rel_err(dw, dw_ref) < 1e-5


def test_empty_rows():
    x, weight, dy = make((0, 32), torch.bfloat16)
    assert layer_norm_fwd(x, weight, 1e-5).shape == (0, 32)
    dx, dw = layer_norm_bwd(dy, x, weight, 1e-5)
    assert dx.shape == (0, 32) and dw.shape == (32,) and not dw.any()


def test_rejects_bad_shapes():
    x, weight, _ = make((2, 32), torch.float32)
    with pytest.raises(ValueError, match="weight shape"):
        layer_norm_fwd(x, weight[:16], 1e-5)
    with pytest.raises(ValueError, match="outside"):
        layer_norm_fwd(torch.empty(1, 2 * MAX_N, device=DEVICE), weight, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x, weight, dy = make((3, 5, 48), dtype)
    torch.library.opcheck(torch.ops.cohere_fx.layer_norm.default,
                          (x.requires_grad_(), weight.requires_grad_(), 1e-5))
    torch.library.opcheck(torch.ops.cohere_fx.layer_norm_backward.default, (dy, x.detach(), weight.detach(), 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_through_op(dtype):
    x, weight, dy = make((3, 5, 96), dtype)
    x.requires_grad_()
    weight.requires_grad_()
    y = torch.ops.cohere_fx.layer_norm(x, weight, 0.1)
    dx, dw = torch.autograd.grad(y, (x, weight), dy)
    dx_ref, dw_ref = ref64_grads(dy, x, weight, 0.1)
    assert rel_err(y, ref64(x.detach().cpu(), weight.detach().cpu(), 0.1)) < TOL[dtype]
    assert rel_err(dx, dx_ref) < TOL[dtype] and rel_err(dw, dw_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_reference_matches_fp64(dtype):
    """The op's non-Triton path (used on devices Triton cannot run on) agrees with the same fp64 reference."""
    x, weight, dy = make((7, 200), dtype, device="cpu")
    dx_ref, dw_ref = ref64_grads(dy, x, weight, 0.1)
    dx, dw = layer_norm_backward_reference(dy, x, weight, 0.1)
    assert rel_err(layer_norm_reference(x, weight, 0.1), ref64(x, weight, 0.1)) < TOL[dtype]
    assert rel_err(dx, dx_ref) < TOL[dtype] and rel_err(dw, dw_ref) < TOL[dtype]


@pytest.mark.gpu
def test_cuda_8192x4096_bf16():
    x, weight, dy = make((8192, 4096), torch.bfloat16, device="cuda")
    y = layer_norm_fwd(x, weight, 1e-5)
    dx, dw = layer_norm_bwd(dy, x, weight, 1e-5)
    dx_ref, dw_ref = ref64_grads(dy, x, weight, 1e-5)
    assert rel_err(y, ref64(x, weight, 1e-5)) < 1e-2
    assert rel_err(dx, dx_ref) < 1e-2 and rel_err(dw, dw_ref) < 1e-2

    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y_op = torch.ops.cohere_fx.layer_norm(xg, wg, 1e-5)
    dx_op, dw_op = torch.autograd.grad(y_op, (xg, wg), dy)
    assert torch.equal(y_op, y) and torch.equal(dx_op, dx) and torch.equal(dw_op, dw)
    torch.library.opcheck(torch.ops.cohere_fx.layer_norm.default, (x[:64].requires_grad_(), wg, 1e-5))
