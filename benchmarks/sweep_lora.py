"""Launch-config sweeps for the LoRA backward kernels on a GPU, at the r7b-8L LoRA step's shapes (4096 tokens).
CUDA-graph timed (the launchers' host time is not the kernel's), each call on another copy of its big operand so
that ~256 MB stream from HBM per replay, as in a training step.
- expand: lora_expand's one-pass backward (``_expand_bwd_kernel``), rank 16, dy [4096, N] bf16 for N = 14336 (gate,
  up), 4096 (q, o, down), 1024 (k, v), beside the two passes it replaces; GB/s of dy.
- shrink: lora_shrink's backward (dx = dh @ A and dA), x [4096, K] bf16: K = 4096 at rank 80 (lora_shared_input's
  q/k/v/gate/up) and 16 (o), K = 14336 at rank 16 (down); GB/s of x read and dx written; then dx alone
  (``shrink_dx``, GB/s of dx written) and dA alone (``_row_sum``, GB/s of x read).
- tiles: lora_shrink's backward at rank 80 over its tiles (``WIDE_DX_TILE``, ``WIDE_DA_TILE``) and dx's dots
  (``SPLIT_FP32_DOTS``: six bf16 dots of exact splits, or tf32x3), then dx at rank 16 with either dot.
- fwd: lora_expand's forward with either fp32 dot (N 14336 / 4096 / 1024, rank 16; GB/s of base read and out
  written), then lora_shrink's forward kernel launched over its tiles and with or without its split of K into
  partial sums (x [4096, K] at rank 80 and 16; GB/s of x read).

    python benchmarks/sweep_lora.py [expand] [shrink] [tiles] [fwd]  # expand and shrink by default; us and GB/s per case
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
                               lambda x, a, dh=dh, r=r: (lora._row_sum(dh, x, 1.0, lora.SHRINK_BWD_STAGES,
                                                                       tile=lora.WIDE_DA_TILE if r > 32 else None),),
                               nbytes)
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
DOTS = {True: "bf16 x6", False: "tf32x3 "}
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
if "tiles" in sections:
    cases = shrink_cases()
    dx_wide = {name: case for name, case in cases.items() if name == "K 4096 r80 dx"}
    for block_m, block_k, warps, split in itertools.product([32, 64, 128], [32, 64, 128], [4, 8], [True, False]):
        lora.WIDE_DX_TILE, lora.SPLIT_FP32_DOTS = (block_m, block_k, warps), split
        row(f"dx {DOTS[split]} BLOCK_M {block_m:3d} BLOCK_K {block_k:3d} warps {warps}", dx_wide)
    for split in (True, False):
        lora.SPLIT_FP32_DOTS = split
        row(f"dx {DOTS[split]} rank 16", {name: case for name, case in cases.items() if "r16 dx" in name})
    da_wide = {name: case for name, case in cases.items() if name == "K 4096 r80 dA"}
    for block_m, block_c, warps in itertools.product([16, 32], [128, 256], [4, 8]):
        lora.WIDE_DA_TILE = (block_m, block_c, warps)
        row(f"dA BLOCK_M {block_m:3d} BLOCK_C {block_c:3d} warps {warps} stages {lora.SHRINK_BWD_STAGES}", da_wide)


def run_shrink_fwd(x, a, block_m, block_k, warps, split_k):
    """lora_shrink_fwd with the tile given (split_k: K cut into partial sums as the launcher does, else one pass)."""
    (m, k), r = x.shape, a.shape[0]
    parts, chunk = lora._partitions(lora.cdiv(m, block_m), k, block_k, x) if split_k else (1, k)
    partial = torch.empty((parts, m, r), dtype=torch.float32, device=x.device)
    lora._shrink_fwd_kernel[(lora.cdiv(m, block_m), parts)](
        x, a, partial, m, r, x.stride(0), K=k, K_CHUNK=chunk, BLOCK_M=block_m, BLOCK_K=block_k,
        RANK=lora._tiles(r)[0], PRECISION="tf32", BF16_DOT=True, num_warps=warps)
    return (partial.sum(0) if split_k else partial[0],)


if "fwd" in sections:
    cases = {}
    for n in (14336, 4096, 1024):
        torch.manual_seed(n)
        base = torch.randn(M, n, device="cuda").bfloat16()
        h, b = torch.randn(M, RANK, device="cuda"), torch.randn(n, RANK, device="cuda") / RANK ** 0.5
        want = base.double() + (h.double() @ b.double().t()) * SCALING
        cases[f"N{n:5d}"] = (copies_of(base), (h, b, SCALING, False), ((want, 2 ** -7),),
                             lambda base, *args: (lora.lora_expand_fwd(base, *args),), 4 * base.numel())
    for split in (True, False):
        lora.SPLIT_FP32_DOTS = split
        row(f"expand forward {DOTS[split]}", cases)
    lora.SPLIT_FP32_DOTS = True
    shapes = {}
    for k, r in ((4096, 80), (4096, 16), (14336, 16)):
        torch.manual_seed(k + r)
        x, a = torch.randn(M, k, device="cuda").bfloat16(), torch.randn(r, k, device="cuda") / k ** 0.5
        shapes[f"K{k:5d} r{r:2d}"] = (copies_of(x), a, x.double() @ a.double().t())
    for block_m, block_k, warps, split_k in itertools.product([16, 32, 64], [64, 128, 256], [4, 8], [True, False]):
        cases = {name: (copies, (a,), ((want, 1e-4),),  # one fp32 sum over all of K: ~1e-5 off fp64
                        lambda x, a: run_shrink_fwd(x, a, block_m, block_k, warps, split_k), 2 * copies[0].numel())
                 for name, (copies, a, want) in shapes.items()}
        row(f"shrink forward BLOCK_M {block_m:2d} BLOCK_K {block_k:3d} warps {warps} split K {split_k:d}", cases)
