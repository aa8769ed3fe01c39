"""decode_residual on a GPU: one launch for a decode step's ``residual + attn @ Wo.T + mlp @ Wd.T`` against the
three launches it replaces (decode_linear for o, decode_linear for down, parallel_residual) and against cuBLAS +
eager adds, at Command-R7B's shapes, over launch configs. Each timed call streams enough layers' weights (>= 512 MB)
that nothing is served from L2; CUDA-graph timed, so launch gaps count.

    python benchmarks/sweep_decode_residual.py [--out DIR] [--rows 1,16]
prints a table and writes decode_residual-sweep-<date>.json to DIR.
"""
import argparse
import itertools
import math

import torch
import triton
import triton.testing

import cohere_fx.ops  # noqa: F401
from cohere_fx.kernels.decode_residual import CONFIG, decode_residual_fwd

from sweep_record import write_sweep_record

H, FFN = 4096, 14336
CONFIGS = list(itertools.product([16, 32, 64], [128, 256], [4], [2, 4, 6], [False]))  # 8 warps: slower in every
# decode_linear group (sweep-decode_linear-h100-20261206T0448.log)
assert CONFIG in CONFIGS
STREAM_BYTES = 512 << 20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--rows", default="1,16", help="comma-separated batch rows (<= 16)")
    args = parser.parse_args()
    ops = torch.ops.cohere_fx
    dev, dt = "cuda", torch.bfloat16
    nbytes = (H * H + FFN * H) * 2
    copies = math.ceil(STREAM_BYTES / nbytes)
    layers = [(torch.randn(H, H, device=dev, dtype=dt) / H ** 0.5,
               torch.randn(H, FFN, device=dev, dtype=dt) / FFN ** 0.5) for _ in range(copies)]
    rows = []
    for m in [int(r) for r in args.rows.split(",")]:
        residual, attn, mlp = (torch.randn(m, k, device=dev, dtype=dt) for k in (H, H, FFN))

        def per_layer(fn):
            return triton.testing.do_bench_cudagraph(lambda: [fn(wo, wd) for wo, wd in layers]) / copies

        times = {
            "cublas": per_layer(lambda wo, wd: residual + attn @ wo.t() + mlp @ wd.t()),
            "unfused": per_layer(lambda wo, wd: ops.parallel_residual(
                residual, ops.decode_linear(attn, [wo])[0], ops.decode_linear(mlp, [wd])[0])),
        }
        fused = {}
        for config in CONFIGS:
            try:
                out = decode_residual_fwd(residual, attn, layers[0][0], mlp, layers[0][1], config)
            except triton.runtime.errors.OutOfResources:  # more shared memory than this GPU has: not a candidate
                continue
            ref = ops.parallel_residual(residual, ops.decode_linear(attn, [layers[0][0]])[0],
                                        ops.decode_linear(mlp, [layers[0][1]])[0])
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
            fused[config] = per_layer(lambda wo, wd: decode_residual_fwd(residual, attn, wo, mlp, wd, config))
        best = min(fused, key=fused.get)
        times.update({f"fused {CONFIG} (current)": fused[CONFIG], f"fused {best} (best)": fused[best]})
        rows.append({"m": m, "bytes": nbytes, "copies": copies, "ms": times,
                     "fused_ms": {str(c): t for c, t in fused.items()}})
        rate = ", ".join(f"{k} {v * 1e3:6.1f} us ({nbytes / v / 1e6:4.0f} GB/s)" for k, v in times.items())
        print(f"M={m:2d}: {rate}", flush=True)
    write_sweep_record(args.out, "decode_residual", rows)


if __name__ == "__main__":
    main()
