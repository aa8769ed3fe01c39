"""Launch-config sweep for the paged_attention decode kernel on a GPU, CUDA-graph timed: tile width, warps,
programs per SM (fewer: fewer partitions to combine, longer loops per program) and pipelining stages, at issue 5's
16 x 4096 case and at the engine's decode contexts (r7b-8L shapes, pages of 16).

    python benchmarks/sweep_paged_attention.py    # prints GB/s per (TILE_N, NUM_WARPS, PROGRAMS_PER_SM, STAGES), case;
                                                  # then one partition per sequence and kv head (no reduce launch)
"""
import itertools

import torch
import triton.testing

import cohere_fx.ops  # noqa: F401
from cohere_fx.bench.kernels import _paged_case
from cohere_fx.bench.models import Shape, config_for
from cohere_fx.kernels import paged_attention as kernels

shape = Shape.of(config_for("r7b-8L"))
CASES = [(16, 4096), (1, 640), (16, 640), (64, 2112)]


def rand(*size):
    return torch.randn(*size, device="cuda", dtype=torch.bfloat16)


inputs = {case: _paged_case(shape, *case, "cuda", rand) for case in CASES}
scale = shape.head_dim ** -0.5


def row(label, call):
    cells = []
    for (batch, context), (args, _, reference, _) in inputs.items():
        nbytes = sum(t.numel() * t.element_size() for t in args[1:3])
        try:
            torch.testing.assert_close(call(*args), reference(*args), rtol=2e-2, atol=2e-2)
            ms = triton.testing.do_bench_cudagraph(lambda: call(*args))
            cells.append(f"B{batch}x{context} {ms * 1e3:6.1f} us {nbytes / ms / 1e6:5.0f} GB/s")
        except Exception as e:  # noqa: BLE001 - a config the GPU cannot run is reported, not fatal
            cells.append(f"B{batch}x{context} {type(e).__name__}")
    print(f"{label}: " + " | ".join(cells), flush=True)


for tile, warps, per_sm, stages in itertools.product([64, 128], [4], [1, 2, 4, 8], [1, 2, 3]):
    kernels.TILE_N, kernels.NUM_WARPS, kernels.PROGRAMS_PER_SM, kernels.STAGES = tile, warps, per_sm, stages
    row(f"tile {tile:3d} warps {warps} per_sm {per_sm:2d} stages {stages}", lambda q, k, v, t, n: (
        torch.ops.cohere_fx.paged_attention(q, k, v, t, n, scale, 0)))
# One partition per (sequence, kv head): no reduce launch, but only batch x kv_heads programs (128 at B16).
for tile, stages in itertools.product([64, 128], [2, 3, 4]):
    kernels.NUM_WARPS, kernels.STAGES = 4, stages
    row(f"tile {tile:3d} warps 4 parts  1 stages {stages}", lambda q, k, v, t, n: (
        kernels.paged_attention_fwd(q, k, v, t, n, scale, 0, parts=1, tile_n=tile)))
