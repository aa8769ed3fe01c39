"""Launch-config sweeps for the LoRA backward kernels on a GPU, at the r7b-8L LoRA step's shapes (4096 tokens).
CUDA-graph timed (the launchers' host time is not the kernel's), each call on another copy of its big operand so
that ~256 MB stream from HBM per replay, as in a training step.
- expand: lora_expand's one-pass backward (``_expand_bwd_kernel``), rank 16, dy [4096, N] bf16 for N = 14336 (gate,
  up), 4096 (q, o, down), 1024 (k, v), beside the two passes it replaces; GB/s of dy.
- shrink: lora_shrink's backward (dx = dh @ A and dA), x [4096, K] bf16: K = 4096 at rank 80 (lora_shared_input's
  q/k/v/gate/up) and 16 (o), K = 14336 at rank 16 (down); GB/s of x read and dx written; then dx alone
  (``shrink_dx``, GB/s of dx written) and dA alone (``_row_sum``, GB/s of x read).

    python benchmarks/sweep_lora.py [expand] [shrink]    # both by default; us per call and GB/s per config and shape
"""
import itertools
import sys

import torch
import triton.testing

from cohere_fx.kernels import lora


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


M, RANK, SCALING = 4096, 16, 2.0


def copies_of(t):
    return [t] + [t.clone() for _ in range(max(0, (256 << 20) // (t.numel() * t.element_size()) - 1))]


def expand_cases():
    cases = {}
    for n in (14336, 4096, 1024):
        torch.manual_seed(n)
        dy = torch.randn(M, n, device="cuda").bfloat16()
        h, b = torch.randn(M, RANK, device="cuda"), torch.randn(n, RANK, device="cuda") / RANK ** 0.5
        g = dy.double() * SCALING
        cases[f"N{n:5d}"] = (copies_of(dy), (h, b, SCALING), ((g @ b.double(), 1e-5), (g.t() @ h.double(), 1e-5)),
                             lora.lora_expand_bwd, dy.numel() * 2)
    return cases


def shrink_cases():
    cases = {}
    for k, r in ((4096, 80), (4096, 16), (14336, 16)):
        torch.manual_seed(k + r)
        x, a = torch.randn(M, k, device="cuda").bfloat16(), torch.randn(r, k, device="cuda") / k ** 0.5
        dh = torch.randn(M, r, device="cuda")
        dx, da = (dh.double() @ a.double(), 2 ** -7), (dh.double().t() @ x.double(), 1e-5)  # dx rounded to bf16
        name, nbytes = f"K{k:5d} r{r:2d}", x.numel() * 2
        cases[name] = (copies_of(x), (a,), (dx, da), lambda x, a, dh=dh: lora.lora_shrink_bwd(dh, x, a), 2 * nbytes)
        cases[f"{name} dx"] = (copies_of(x), (a,), (dx,), lambda x, a, dh=dh: (lora.shrink_dx(dh, x, a),), nbytes)
        cases[f"{name} dA"] = (copies_of(x), (a,), (da,),
                               lambda x, a, dh=dh: (lora._row_sum(dh, x, 1.0, lora.SHRINK_BWD_STAGES),), nbytes)
    return cases


def row(label, cases):
    cells = []
    for name, (copies, args, want, fn, nbytes) in cases.items():
        try:
            for got, (value, tolerance) in zip(fn(copies[0], *args), want):
                assert rel_err(got, value) < tolerance, f"relative error {rel_err(got, value):.1e}"
            ms = triton.testing.do_bench_cudagraph(lambda: [fn(c, *args) for c in copies]) / len(copies)
            cells.append(f"{name} {ms * 1e3:6.1f} us {nbytes / ms / 1e6:5.0f} GB/s")
        except Exception as e:  # noqa: BLE001 - a config the GPU cannot run is reported, not fatal
            cells.append(f"{name} {type(e).__name__}: {str(e)[:60]}")
    print(f"{label}: " + " | ".join(cells), flush=True)


sections = sys.argv[1:] or ["expand", "shrink"]
if "expand" in sections:
    cases = expand_cases()
    fused_max = lora.FUSED_BWD_MAX_RANK
    lora.FUSED_BWD_MAX_RANK = 0
    row("two passes (_row_sum x 2)                 ", cases)
    lora.FUSED_BWD_MAX_RANK = fused_max
    for block_n, block_m, warps, stages in itertools.product([128, 256], [32, 64], [4, 8], [1, 2, 3]):
        lora.EXPAND_BWD_BLOCK_N, lora.EXPAND_BWD_BLOCK_M, lora.EXPAND_BWD_WARPS = block_n, block_m, warps
        lora.EXPAND_BWD_STAGES = stages
        row(f"one pass BLOCK_N {block_n:3d} BLOCK_M {block_m:2d} warps {warps} stages {stages}", cases)
if "shrink" in sections:
    cases = shrink_cases()
    for persistent, stages in itertools.product([False, True], [1, 2, 3]):
        lora.SHRINK_DX_PERSISTENT, lora.SHRINK_BWD_STAGES = persistent, stages
        row(f"shrink backward, dx {'persistent' if persistent else 'one tile a program'} stages {stages}", cases)
