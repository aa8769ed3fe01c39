"""Launch-config sweep for the decode_residual kernel on a GPU, CUDA-graph timed (launch gaps count): a decode
layer's tail ``residual + o_proj(attn) + down_proj(swiglu(gate, up))`` as the decode graph ran it before the
fusion (cuBLAS o_proj, cohere_fx.swiglu, cuBLAS down_proj, cohere_fx.parallel_residual: 4 ops, up to 6 kernels)
against the one fused launch, at Command-R7B shapes (hidden 4096, MLP 14336) and Command A's (12288, 36864),
1 and 16 rows. The weights (151 MB and 1.2 GB) do not fit in L2, so each replay streams them from memory.

    python benchmarks/sweep_decode_residual.py    # one line per shape: unfused, then each config's us and GB/s
"""
import itertools

import torch
import triton.testing

import cohere_fx.ops  # noqa: F401
from cohere_fx.kernels import decode_residual as kernel

SHAPES = {"command-r7b": (4096, 4096, 14336), "command-a": (12288, 12288, 36864)}
CONFIGS = list(itertools.product([32, 64], [128, 256], [1024, 2048, 4096], [4, 8], [4]))
ops = torch.ops.cohere_fx


def unfused(residual, attn, wo, gate, up, wd):
    return ops.parallel_residual(residual, attn @ wo.t(), ops.swiglu(gate, up) @ wd.t())


for (name, (n, ka, kf)), rows in itertools.product(SHAPES.items(), [1, 16]):
    rand = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    args = (rand(rows, n), rand(rows, ka), rand(n, ka) / ka ** 0.5, rand(rows, kf), rand(rows, kf),
            rand(n, kf) / kf ** 0.5)
    nbytes = (n * (ka + kf) + rows * (2 * n + ka + 2 * kf)) * 2
    ref = unfused(*args).float()
    cells = [f"unfused {triton.testing.do_bench_cudagraph(lambda: unfused(*args)) * 1e3:6.1f} us"]
    best = None
    for config in CONFIGS:
        try:
            out = kernel.decode_residual_fwd(*args, config=config)
            torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
            ms = triton.testing.do_bench_cudagraph(lambda: kernel.decode_residual_fwd(*args, config=config))
        except Exception as e:  # noqa: BLE001 - a config the GPU cannot run is reported, not fatal
            print(f"  {name} M={rows} {config}: {type(e).__name__}: {str(e)[:80]}")
            continue
        best = min(best or (ms, config), (ms, config))
        print(f"  {name} M={rows} {config}: {ms * 1e3:6.1f} us {nbytes / ms / 1e6:5.0f} GB/s", flush=True)
    if best:
        cells.append(f"best {best[0] * 1e3:6.1f} us {nbytes / best[0] / 1e6:5.0f} GB/s {best[1]}")
    print(f"{name:12s} M={rows:2d}: " + " | ".join(cells), flush=True)
