"""CohereLayerNorm (weight only, fp32 statistics) in Triton: forward and backward.

Each row lives in registers whole (BLOCK_N >= N), so the variance is the two-pass ``mean((x - mean)^2)`` of
the HF module at no extra memory traffic: the forward reads x and writes y once. The backward recomputes
mean and rstd from x, which it must read anyway, so the forward saves nothing. dw is a sum over all rows:
each backward program accumulates its block of rows in an fp32 register row and writes one partial row; the
few partial rows are summed afterwards (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from cohere_fx.kernels import cdiv, next_power_of_2, on_device, persistent_programs
from cohere_fx.kernels.dependent_launch import dependent_launch, wait_for_inputs

MAX_N = 16384


@triton.jit
def _row_mean(v, N):
    """Sum over the row divided by N with IEEE division (as torch.mean): at N = 1, x - mean is exactly 0."""
    return tl.math.div_rn(tl.sum(v, axis=0), tl.full([], N, tl.float32))


@triton.jit
def _layer_norm_fwd_kernel(X, W, Y, stride_x, N, eps, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    mean = _row_mean(x, N)
    d = tl.where(mask, x - mean, 0.0)
    rstd = tl.math.rsqrt(_row_mean(d * d, N) + eps)
    y = w * (d * rstd)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(DY, X, W, DX, DW_PARTIAL, stride_dy, stride_x, M, N, eps, rows_per_program,
                           BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row + rows_per_program, M)
    # A while loop, not range(row, row_end): Triton 3.6's interpreter cannot take a runtime range bound under
    # numpy >= 2.4 (triton-lang/triton#9171). For sm_90 both forms compile alike (same registers, no
    # pipelined loads: nothing here feeds a tl.dot).
    while row < row_end:
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = _row_mean(x, N)
        d = tl.where(mask, x - mean, 0.0)
        rstd = tl.math.rsqrt(_row_mean(d * d, N) + eps)
        xhat = d * rstd
        g = dy * w
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); masked lanes hold zeros in g and xhat.
        mean_g = _row_mean(g, N)
        mean_gx = _row_mean(g * xhat, N)
        dx = rstd * (g - mean_g - xhat * mean_gx)
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        row += 1
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)


def _fwd_num_warps(block_n: int) -> int:
    return 4 if block_n <= 2048 else 8 if block_n <= 8192 else 16


def _bwd_num_warps(block_n: int) -> int:
    # The backward keeps ~4 row-sized fp32 arrays live (w, dw, x, dy) against the forward's ~2. ptxas for sm_90
    # (triton 3.6): 128 registers and no spills up to 8192 with these counts; 16384 spills either way, less
    # per element with 32 warps (64 registers) than with 16.
    return 4 if block_n <= 1024 else 8 if block_n <= 4096 else 16 if block_n <= 8192 else 32


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as [rows, n] with unit column stride (a view where possible)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"layer_norm: last dim {n} is outside [1, {MAX_N}]")
    if weight.shape != (n,):
        raise ValueError(f"layer_norm: weight shape {tuple(weight.shape)} != ({n},)")
    return n


def _block(n: int) -> int:
    """Columns per program: the row rounded up to a power of two, at least 16 (a 1-element block would be
    spread over every thread of the warps)."""
    return max(16, next_power_of_2(n))


# A partial dw row (written, then read by the sum) costs ~1.3 rows of bf16 x/dy/dx traffic: with few rows,
# use fewer programs rather than one row each.
_MIN_ROWS_PER_PROGRAM = 4


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x - mean) * rsqrt(var + eps) over the last dim, statistics in fp32; y: x's shape and dtype."""
    n = _check(x, weight)
    x2 = _rows(x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        block_n = _block(n)
        with on_device(x):
            _layer_norm_fwd_kernel[(m,)](x2, weight.contiguous(), y, x2.stride(0), n, float(eps),
                                         BLOCK_N=block_n, num_warps=_fwd_num_warps(block_n),
                                         **dependent_launch(x))
    return y.view(x.shape)


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) of layer_norm_fwd; dx in x.dtype and x's shape, dw in weight.dtype (summed in fp32)."""
    n = _check(x, weight)
    if dy.shape != x.shape:
        raise ValueError(f"layer_norm: dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    x2, dy2 = _rows(x, n), _rows(dy, n)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return dx.view(x.shape), torch.zeros_like(weight, memory_format=torch.contiguous_format)
    rows_per_program = cdiv(m, min(persistent_programs(x), cdiv(m, _MIN_ROWS_PER_PROGRAM)))
    programs = cdiv(m, rows_per_program)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    block_n = _block(n)
    with on_device(x):
        _layer_norm_bwd_kernel[(programs,)](dy2, x2, weight.contiguous(), dx, dw_partial, dy2.stride(0),
                                            x2.stride(0), m, n, float(eps), rows_per_program,
                                            BLOCK_N=block_n, num_warps=_bwd_num_warps(block_n))
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)
