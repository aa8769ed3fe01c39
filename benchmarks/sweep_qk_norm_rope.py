"""Launch-config sweep for the qk_norm_rope kernel on a GPU (r7b-8L prefill shapes), CUDA-graph timed.

    python benchmarks/sweep_qk_norm_rope.py      # prints GB/s per (TILE_ELEMENTS, NUM_WARPS), fwd and bwd
"""
import itertools

import torch
import triton.testing

import cohere_fx.ops  # noqa: F401
from cohere_fx.kernels import qk_norm_rope as kernels

B, S, H, HK, D = 4, 2048, 32, 8, 128
dev, dt = "cuda", torch.bfloat16
q = torch.randn(B, S, H, D, device=dev, dtype=dt)
k = torch.randn(B, S, HK, D, device=dev, dtype=dt)
cos, sin = torch.randn(1, S, D, device=dev, dtype=dt), torch.randn(1, S, D, device=dev, dtype=dt)
qw, kw = torch.randn(H, D, device=dev, dtype=dt), torch.randn(HK, D, device=dev, dtype=dt)
dq_out, dk_out = torch.randn(B, H, S, D, device=dev, dtype=dt), torch.randn(B, HK, S, D, device=dev, dtype=dt)
fwd_bytes = 2 * (q.numel() + k.numel()) * 2
bwd_bytes = 3 * (q.numel() + k.numel()) * 2

for tile, warps in itertools.product([1024, 2048, 4096, 8192], [2, 4, 8]):
    kernels.TILE_ELEMENTS, kernels.NUM_WARPS, kernels.BWD_NUM_WARPS = tile, warps, warps
    fwd = triton.testing.do_bench_cudagraph(lambda: kernels.qk_norm_rope_fwd(q, k, cos, sin, qw, kw, 1e-5))
    bwd = triton.testing.do_bench_cudagraph(
        lambda: kernels.qk_norm_rope_bwd(dq_out, dk_out, q, k, cos, sin, qw, kw, 1e-5))
    print(f"tile {tile:5d} warps {warps}: fwd {fwd * 1e3:7.1f} us {fwd_bytes / fwd / 1e6:6.0f} GB/s | "
          f"bwd {bwd * 1e3:7.1f} us {bwd_bytes / bwd / 1e6:6.0f} GB/s", flush=True)
