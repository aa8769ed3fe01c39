"""``decode_residual``: the end of a Cohere decoder layer in a decode step, ``residual + attn @ Wo.T + mlp @ Wd.T``
(o_proj, down_proj and the parallel residual) in one launch.

Why: at decode, o_proj and down_proj only stream their weights. As two ``decode_linear`` launches and a
``parallel_residual`` launch, o's 4096 x 4096 weight is too short a stream to reach the rate down's reaches (2.45 vs
2.86 TB/s on an H100 at 16 rows, kernels/decode_linear.py), and each launch adds its tail and its gap. Here each
program owns BLOCK_N of the layer's output features, streams its rows of Wo and then of Wd (one stream as long as
both), and writes the layer's output.

Rounding is the unfused ops', so the output is bitwise theirs: each product is an fp32 dot rounded once to the
dtype, then ``residual + attn`` is rounded, then ``+ mlp`` (eager's order of ``residual + attn + mlp``).
"""
import triton
import triton.language as tl

from cohere_fx.kernels import cdiv, next_power_of_2
from cohere_fx.kernels.dependent_launch import dependent_launch, wait_for_inputs
from cohere_fx.kernels.decode_linear import MAX_ROWS, SINGLE_CONFIG, decode_linear_acc, launch_options


@triton.jit
def _decode_residual_kernel(r_ptr, a_ptr, wo_ptr, h_ptr, wd_ptr, y_ptr, M, N, stride_rm, stride_am, stride_hm,
                            stride_ym, KO: tl.constexpr, KD: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            UPCAST: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    n0 = tl.program_id(0) * BLOCK_N
    attn = decode_linear_acc(a_ptr, wo_ptr, n0, M, N, stride_am, KO, KO, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
                             UPCAST)
    mlp = decode_linear_acc(h_ptr, wd_ptr, n0, M, N, stride_hm, KD, KD, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
                            UPCAST)
    dtype = y_ptr.dtype.element_ty
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    residual = tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    partial = (residual + attn.to(dtype).to(tl.float32)).to(dtype)
    out = partial.to(tl.float32) + mlp.to(dtype).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(dtype), mask=mask)


# (BLOCK_N, BLOCK_K, num_warps, num_stages, UPCAST): down's config, the longer of the two streams. The H100 sweep
# (benchmarks/sweep_decode_residual.py; benchmarks/results/decode_residual-sweep-20261206T124400.json): 54.1 / 54.7 us
# per Command-R7B layer at 1 / 16 rows with it, 58.4 / 59.0 us for the three launches it replaces; the sweep's best
# (6 stages: 53.7 / 54.1) compiles to the same code for sm_90 (num_stages leaves this loop unpipelined).
CONFIG = SINGLE_CONFIG


def decode_residual_fwd(residual, attn, o_weight, mlp, down_weight, config=None):
    """residual [M, N], attn [M, Ko], mlp [M, Kd] (M <= MAX_ROWS, unit last strides); o_weight [N, Ko] and
    down_weight [N, Kd] row-major, all of one dtype -> [M, N]."""
    import torch

    from cohere_fx.kernels import on_device

    m, n = residual.shape
    shapes_fit = (attn.shape[0] == m == mlp.shape[0] and o_weight.shape == (n, attn.shape[1])
                  and down_weight.shape == (n, mlp.shape[1]))
    if not shapes_fit or m > MAX_ROWS or any(t.stride(-1) != 1 for t in (residual, attn, mlp)) \
            or not (o_weight.is_contiguous() and down_weight.is_contiguous()) \
            or len({t.dtype for t in (residual, attn, o_weight, mlp, down_weight)}) != 1:
        raise ValueError(
            f"decode_residual: residual [M <= {MAX_ROWS}, N], attn [M, Ko], mlp [M, Kd], row-major weights [N, Ko] "
            f"and [N, Kd] of one dtype, unit last strides; got " + ", ".join(
                f"{t.dtype}{tuple(t.shape)} strides {t.stride()}" for t in (residual, attn, o_weight, mlp,
                                                                             down_weight)))
    config = config or CONFIG
    block_n, block_k = config[:2]
    out = torch.empty_like(residual, memory_format=torch.contiguous_format)
    with on_device(residual):
        _decode_residual_kernel[(cdiv(n, block_n),)](
            residual, attn, o_weight, mlp, down_weight, out, m, n, residual.stride(0), attn.stride(0),
            mlp.stride(0), out.stride(0), KO=attn.shape[1], KD=mlp.shape[1],
            BLOCK_K=min(block_k, next_power_of_2(min(attn.shape[1], mlp.shape[1]))), **launch_options(residual, config),
            **dependent_launch(residual))
    return out
