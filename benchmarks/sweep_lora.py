"""Launch-config sweep for lora_expand's one-pass backward (``_expand_bwd_kernel``) on a GPU, at the r7b-8L LoRA
step's shapes (4096 tokens, rank 16; dy [4096, N] bf16 for N = 14336 (gate, up), 4096 (q, o, down), 1024 (k, v)),
beside the two passes it replaces. L2 is flushed before every call (triton.testing.do_bench), as in a training
step, where dy comes from a GEMM of its own.

    python benchmarks/sweep_lora.py    # prints us and dy's GB/s per (BLOCK_N, BLOCK_M, warps) and N
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
    cases[n] = (dy, h, b, (g @ b.double(), g.t() @ h.double()))


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def row(label):
    cells = []
    for n, (dy, h, b, want) in cases.items():
        try:
            got = lora.lora_expand_bwd(dy, h, b, SCALING)
            err = max(rel_err(x, w) for x, w in zip(got, want))
            assert err < 1e-5, f"relative error {err:.1e}"
            ms = triton.testing.do_bench(lambda: lora.lora_expand_bwd(dy, h, b, SCALING), warmup=10, rep=50)
            cells.append(f"N{n:5d} {ms * 1e3:6.1f} us {dy.numel() * 2 / ms / 1e6:5.0f} GB/s")
        except Exception as e:  # noqa: BLE001 - a config the GPU cannot run is reported, not fatal
            cells.append(f"N{n:5d} {type(e).__name__}: {str(e)[:60]}")
    print(f"{label}: " + " | ".join(cells), flush=True)


fused_max = lora.FUSED_BWD_MAX_RANK
lora.FUSED_BWD_MAX_RANK = 0
row("two passes (_row_sum x 2)       ")
lora.FUSED_BWD_MAX_RANK = fused_max
for block_n, block_m, warps in itertools.product([128, 256, 512], [32, 64, 128], [4, 8]):
    lora.EXPAND_BWD_BLOCK_N, lora.EXPAND_BWD_BLOCK_M, lora.EXPAND_BWD_WARPS = block_n, block_m, warps
    row(f"one pass BLOCK_N {block_n:3d} BLOCK_M {block_m:3d} warps {warps}")
