"""Launch-config sweep for lora_expand's one-pass backward (``_expand_bwd_kernel``) on a GPU, at the r7b-8L LoRA
step's shapes (4096 tokens, rank 16; dy [4096, N] bf16 for N = 14336 (gate, up), 4096 (q, o, down), 1024 (k, v)),
beside the two passes it replaces. CUDA-graph timed (the launchers' host time is not the kernel's), each call on
another copy of dy so that ~256 MB stream from HBM per replay, as in a training step where dy comes from a GEMM.

    python benchmarks/sweep_lora.py    # prints us per call and dy's GB/s per (BLOCK_N, BLOCK_M, warps, stages) and N
"""
import itertools

import torch
import triton.testing

from cohere_fx.kernels import lora

M, RANK, SCALING = 4096, 16, 2.0
cases = {}
for n in (14336, 4096, 1024):
    torch.manual_seed(n)
    dy = torch.randn(M, n, device="cuda").bfloat16()
    h, b = torch.randn(M, RANK, device="cuda"), torch.randn(n, RANK, device="cuda") / RANK ** 0.5
    g = dy.double() * SCALING
    copies = [dy] + [dy.clone() for _ in range(max(0, (256 << 20) // (dy.numel() * 2) - 1))]
    cases[n] = (copies, h, b, (g @ b.double(), g.t() @ h.double()))


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def row(label):
    cells = []
    for n, (copies, h, b, want) in cases.items():
        try:
            got = lora.lora_expand_bwd(copies[0], h, b, SCALING)
            err = max(rel_err(x, w) for x, w in zip(got, want))
            assert err < 1e-5, f"relative error {err:.1e}"
            ms = triton.testing.do_bench_cudagraph(
                lambda: [lora.lora_expand_bwd(dy, h, b, SCALING) for dy in copies]) / len(copies)
            cells.append(f"N{n:5d} {ms * 1e3:6.1f} us {copies[0].numel() * 2 / ms / 1e6:5.0f} GB/s")
        except Exception as e:  # noqa: BLE001 - a config the GPU cannot run is reported, not fatal
            cells.append(f"N{n:5d} {type(e).__name__}: {str(e)[:60]}")
    print(f"{label}: " + " | ".join(cells), flush=True)


fused_max = lora.FUSED_BWD_MAX_RANK
lora.FUSED_BWD_MAX_RANK = 0
row("two passes (_row_sum x 2)                 ")
lora.FUSED_BWD_MAX_RANK = fused_max
for block_n, block_m, warps, stages in itertools.product([128, 256], [32, 64], [4, 8], [1, 2, 3]):
    lora.EXPAND_BWD_BLOCK_N, lora.EXPAND_BWD_BLOCK_M, lora.EXPAND_BWD_WARPS, lora.STAGES = block_n, block_m, warps, stages
    row(f"one pass BLOCK_N {block_n:3d} BLOCK_M {block_m:2d} warps {warps} stages {stages}")
