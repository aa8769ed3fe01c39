"""Decode linear layers on a GPU: cuBLAS vs the grouped Triton ``decode_linear`` kernel, per weight group of a
Cohere decode step (q+k+v+gate+up in one launch, o, down, the head) and batch, over launch configs and both dot
forms (UPCAST: tf32 on fp32 copies of the tiles, or bf16). Each timed call streams enough copies of the group's
weights (>= 512 MB, like a step's layers one after another) that nothing is served from the 50 MB L2; CUDA-graph
timed, so launch gaps count.

    python benchmarks/sweep_decode_linear.py [--out DIR] [--groups down,head] [--rows 16]
prints a table and writes decode_linear-sweep-<date>.json to DIR. All groups at 1 and 16 rows take over 5 minutes on
an H100 (most of it compiling the configs): split them over calls with --groups / --rows.
"""
import argparse
import itertools
import math

import torch
import triton
import triton.testing

from cohere_fx.kernels.decode_linear import decode_linear_fwd

from sweep_record import write_sweep_record

H, HKV, FFN, VOCAB = 4096, 1024, 14336, 256000
GROUPS = {"qkv_gate_up": ([H, HKV, HKV, FFN, FFN], H), "o": ([H], H), "down": ([H], FFN), "head": ([VOCAB], H)}
CONFIGS = list(itertools.product([16, 32, 64], [256, 512], [4, 8], [2, 4], [True, False]))
STREAM_BYTES = 512 << 20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--groups", default=",".join(GROUPS), help="comma-separated: " + ",".join(GROUPS))
    parser.add_argument("--rows", default="1,16", help="comma-separated batch rows (<= 16)")
    args = parser.parse_args()
    groups = {name: GROUPS[name] for name in args.groups.split(",")}
    dev, dt = "cuda", torch.bfloat16
    rows = []
    for (name, (sizes, k)), m in itertools.product(groups.items(), [int(r) for r in args.rows.split(",")]):
        nbytes = sum(sizes) * k * 2
        copies = math.ceil(STREAM_BYTES / nbytes)
        x = torch.randn(m, k, device=dev, dtype=dt)
        sets = [[torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for n in sizes] for _ in range(copies)]
        cublas = triton.testing.do_bench_cudagraph(lambda: [x @ w.t() for ws in sets for w in ws]) / copies
        timings = {}
        for config in CONFIGS:
            try:
                outs = decode_linear_fwd(x, sets[0], config)
            except triton.runtime.errors.OutOfResources:  # more shared memory than this GPU has: not a candidate
                continue
            for o, w in zip(outs, sets[0]):
                torch.testing.assert_close(o, x @ w.t(), rtol=2e-2, atol=2e-2)
            timings[config] = triton.testing.do_bench_cudagraph(
                lambda: [decode_linear_fwd(x, ws, config) for ws in sets]) / copies
        best = min(timings, key=timings.get)
        row = {"group": name, "m": m, "bytes": nbytes, "copies": copies, "cublas_ms": cublas,
               "triton_best_ms": timings[best], "triton_best_config": best,
               "triton_ms": {str(c): t for c, t in timings.items()}}
        rows.append(row)
        print(f"{name:12s} M={m:2d} cuBLAS {cublas * 1e3:7.1f} us ({nbytes / cublas / 1e6:5.0f} GB/s)  triton "
              f"{timings[best] * 1e3:7.1f} us ({nbytes / timings[best] / 1e6:5.0f} GB/s) {best}", flush=True)
        del sets
    for upcast in (True, False):
        configs = [c for c in CONFIGS if c[-1] == upcast]
        totals = {c: sum(r["triton_ms"].get(str(c), float("inf")) for r in rows) for c in configs}
        print(f"best single config (upcast={upcast}) over all groups and batches:", min(totals, key=totals.get))
    write_sweep_record(args.out, "decode_linear", rows)


if __name__ == "__main__":
    main()
