"""``decode_linear``: the linear layers of a decode step, ``y = x @ W.T`` for a few rows of ``x`` (M <= 16), up to
five weights that read the same input in one launch.

Why: at decode every linear layer is a matrix-vector product that only streams its weight, so it runs at memory
bandwidth or not at all. cuBLAS picks split-K kernels for most of Cohere's decode shapes, each followed by a
reduction kernel, and q/k/v (three weights reading one input) are three launches: on an H100 a Command-R7B
decode step runs ~540 kernels whose gaps alone cost ~1 ms of a ~7 ms step. Here one program owns BLOCK_N output
features and the whole K, so there is no reduction pass, and the weights that read the same input share one
launch (their programs are laid end to end on the grid): q, k, v, gate and up read one LayerNorm output.

Each program multiplies [BLOCK_M, BLOCK_K] rows of x by a [BLOCK_N, BLOCK_K] tile of W with ``tl.dot`` (M padded
to 16, the MMA minimum), accumulating in fp32 and rounding once, as cuBLAS does. The MMA runs on the bf16/fp16 tiles
themselves, or (UPCAST) on tf32 operands upcast from them; both multiply exactly. The kernel is bound by the weight's
bytes, not by the MMA rate.
"""
import triton
import triton.language as tl

from cohere_fx.kernels import cdiv, next_power_of_2
from cohere_fx.kernels.dependent_launch import dependent_launch, wait_for_inputs


@triton.jit
def decode_linear_acc(x_ptr, w_ptr, n0, M, N, stride_xm, stride_wn,
                      K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The fp32 [BLOCK_M, BLOCK_N] tile ``x[:M] @ w[n0:n0 + BLOCK_N].T`` over the whole K, before rounding."""
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 + rk)[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if UPCAST:  # fp32 operands: exact for bf16/fp16 under tf32, and what the interpreter multiplies correctly
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=DOT_PRECISION)
        else:  # the inputs' own dtype: exact products, fp32 accumulation, half the registers of an fp32 tile
            acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def _decode_linear_tile(x_ptr, w_ptr, y_ptr, n0, M, N, stride_xm, stride_wn, stride_ym,
               K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    acc = decode_linear_acc(x_ptr, w_ptr, n0, M, N, stride_xm, stride_wn, K, BLOCK_M, BLOCK_N, BLOCK_K,
                            DOT_PRECISION, UPCAST)
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _decode_linear_kernel(x_ptr, w0, w1, w2, w3, w4, y0, y1, y2, y3, y4, N0, N1, N2, N3, N4, P1, P2, P3, P4, M, stride_xm,
                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """Weight i's programs start at P_i (P0 = 0; unused slots have N = 0 and no programs). Weights and outputs
    are row-major with rows of K and N_i elements (the launcher makes them so)."""
    pid = tl.program_id(0)
    if pid < P1:
        _decode_linear_tile(x_ptr, w0, y0, pid * BLOCK_N, M, N0, stride_xm, K, N0, K, BLOCK_M, BLOCK_N, BLOCK_K,
                   DOT_PRECISION, UPCAST, PDL)
    elif pid < P2:
        _decode_linear_tile(x_ptr, w1, y1, (pid - P1) * BLOCK_N, M, N1, stride_xm, K, N1, K, BLOCK_M, BLOCK_N, BLOCK_K,
                   DOT_PRECISION, UPCAST, PDL)
    elif pid < P3:
        _decode_linear_tile(x_ptr, w2, y2, (pid - P2) * BLOCK_N, M, N2, stride_xm, K, N2, K, BLOCK_M, BLOCK_N, BLOCK_K,
                   DOT_PRECISION, UPCAST, PDL)
    elif pid < P4:
        _decode_linear_tile(x_ptr, w3, y3, (pid - P3) * BLOCK_N, M, N3, stride_xm, K, N3, K, BLOCK_M, BLOCK_N, BLOCK_K,
                   DOT_PRECISION, UPCAST, PDL)
    else:
        _decode_linear_tile(x_ptr, w4, y4, (pid - P4) * BLOCK_N, M, N4, stride_xm, K, N4, K, BLOCK_M, BLOCK_N, BLOCK_K,
                   DOT_PRECISION, UPCAST, PDL)


MAX_WEIGHTS = 5  # q, k, v, gate and up read one LayerNorm output in Cohere's parallel block
MAX_ROWS = 16  # rows of x: one MMA tile (decode batches up to 16)
# (BLOCK_N, BLOCK_K, num_warps, num_stages, UPCAST) per kind of launch, from benchmarks/sweep_decode_linear.py on
# an H100, each group streamed from HBM as in a decode step
# (benchmarks/results/sweep-decode_linear-h100-20261206T0448.log):
# q+k+v+gate+up in one launch at 2.92 TB/s (cuBLAS 2.52), o at 2.45 (cuBLAS 2.07), down at 2.86 (cuBLAS 2.73), at
# batch 1 and 16 alike. UPCAST: the dot on fp32 copies of the tiles at tf32, else in the inputs' dtype (faster in
# every group of that sweep); forced on for fp32 inputs and under the interpreter. The 256 000-row head keeps the
# config of the 2026-11-25 sweep (3.06 TB/s, cuBLAS 2.88; benchmarks/results/decode_linear-sweep-20261125T175814.json).
# The grouped launch's config is the best of benchmarks/sweep_decode_step.py instead (Command-R7B B16 decode steps
# with every other kernel around it: 6.655 ms a step against 6.715 / 6.720 for the alone-best (16, 256, 4, 2) that
# ran first and last; benchmarks/results/decode_step-sweep-20261206T172516.json).
GROUPED_CONFIG = (32, 512, 4, 3, False)
SINGLE_CONFIG = (32, 256, 4, 4, False)
HEAD_CONFIG = (32, 256, 4, 2, True)
HEAD_MIN_ROWS = 65536


def _config(weights) -> tuple:
    if len(weights) > 1:
        return GROUPED_CONFIG
    return HEAD_CONFIG if weights[0].shape[0] >= HEAD_MIN_ROWS else SINGLE_CONFIG


def launch_options(x, config) -> dict:
    """Keyword arguments of a launch of ``decode_linear_acc``'s kernels for input ``x`` under ``config`` (its K
    tile aside): the dot form, which must be the same for ``decode_residual`` to equal the unfused kernels bitwise."""
    import torch

    _, _, warps, stages, upcast = config
    fp32 = x.dtype == torch.float32
    return dict(BLOCK_M=MAX_ROWS, BLOCK_N=config[0], DOT_PRECISION="ieee" if fp32 else "tf32",
                UPCAST=upcast or not x.is_cuda or fp32, num_warps=warps, num_stages=stages)


def decode_linear_fwd(x, weights, config=None):
    """[x @ w.T for w in weights]: x [M, K] (M <= MAX_ROWS, unit last stride), 1-MAX_WEIGHTS row-major [N_i, K]."""
    import torch

    from cohere_fx.kernels import on_device

    m, k = x.shape
    if not 1 <= len(weights) <= MAX_WEIGHTS or m > MAX_ROWS or x.stride(-1) != 1:
        raise ValueError(f"decode_linear: 1-{MAX_WEIGHTS} weights and x [M <= {MAX_ROWS}, K], unit last stride, got "
                         f"{len(weights)} weights, x {tuple(x.shape)} strides {x.stride()}")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k or not w.is_contiguous() or w.dtype != x.dtype:
            raise ValueError(f"decode_linear: weight {w.dtype}{tuple(w.shape)} strides {w.stride()} does not fit x "
                             f"{x.dtype}{tuple(x.shape)} (row-major [N, K] expected)")
    config = config or _config(weights)
    block_n, block_k = config[:2]
    outs = [torch.empty((m, w.shape[0]), dtype=x.dtype, device=x.device) for w in weights]
    unused = MAX_WEIGHTS - len(weights)
    sizes = [w.shape[0] for w in weights] + [0] * unused
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + cdiv(n, block_n))
    with on_device(x):
        _decode_linear_kernel[(starts[-1],)](
            x, *weights, *weights[:1] * unused, *outs, *outs[:1] * unused, *sizes, *starts[1:MAX_WEIGHTS], m,
            x.stride(0), K=k, BLOCK_K=min(block_k, next_power_of_2(k)), **launch_options(x, config),
            **dependent_launch(x))
    return outs
