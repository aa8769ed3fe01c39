"""Decode linear layers on a GPU: cuBLAS vs the grouped Triton ``decode_linear`` kernel, per Command-R7B weight
group and batch, over a sweep of launch configs; CUDA-graph timed, so launch gaps count. Weights of 48 MB or less
fit the H100's 50 MB L2 across replays, which flatters both sides there (a decode step streams 5.6 GB).

    python benchmarks/sweep_decode_linear.py [--out DIR]   # prints a table; writes decode_linear-sweep-<date>.json to DIR
(run as benchmarks/gemv_probe.py for the 2026-11-25 record)
"""
import argparse
import datetime
import itertools
import json
import os

import torch
import triton
import triton.testing

from cohere_fx.kernels.decode_linear import decode_linear_fwd

H, HKV, FFN, VOCAB = 4096, 1024, 14336, 256000
GROUPS = {"qkv": ([H, HKV, HKV], H), "o": ([H], H), "gate_up": ([FFN, FFN], H), "down": ([H], FFN),
          "head": ([VOCAB], H)}
CONFIGS = list(itertools.product([16, 32, 64], [256, 512], [4, 8], [2, 4]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    rows = []
    for (name, (sizes, k)), m in itertools.product(GROUPS.items(), [1, 16]):
        x = torch.randn(m, k, device=dev, dtype=dt)
        ws = [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for n in sizes]
        nbytes = sum(w.numel() for w in ws) * 2
        cublas = triton.testing.do_bench_cudagraph(lambda: [x @ w.t() for w in ws])
        cublas_t = triton.testing.do_bench_cudagraph(lambda: [(w @ x.t()).t() for w in ws])
        timings = {}
        for config in CONFIGS:
            try:
                outs = decode_linear_fwd(x, ws, config)
            except triton.runtime.errors.OutOfResources:  # more shared memory than this GPU has: not a candidate
                continue
            for o, w in zip(outs, ws):
                torch.testing.assert_close(o, x @ w.t(), rtol=2e-2, atol=2e-2)
            timings[config] = triton.testing.do_bench_cudagraph(lambda: decode_linear_fwd(x, ws, config))
        best = min(timings, key=timings.get)
        row = {"group": name, "m": m, "bytes": nbytes, "cublas_ms": cublas, "cublas_transposed_ms": cublas_t,
               "triton_best_ms": timings[best], "triton_best_config": best,
               "triton_ms": {str(c): t for c, t in timings.items()}}
        rows.append(row)
        print(f"{name:8s} M={m:2d} cuBLAS {cublas * 1e3:8.1f} us ({nbytes / cublas / 1e6:5.0f} GB/s)  "
              f"W@x.T {cublas_t * 1e3:8.1f} us  triton {timings[best] * 1e3:8.1f} us "
              f"({nbytes / timings[best] / 1e6:5.0f} GB/s) {best}", flush=True)
    totals = {c: sum(r["triton_ms"].get(str(c), float("inf")) for r in rows if r["group"] != "head")
              for c in CONFIGS}
    print("best single config over the layer groups:", min(totals, key=totals.get))
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/sweep_decode_linear.py"}
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    with open(os.path.join(args.out, f"decode_linear-sweep-{stamp}.json"), "w") as f:
        json.dump({"env": env, "rows": rows, "config_totals_ms": {str(c): t for c, t in totals.items()}}, f,
                  indent=1)


if __name__ == "__main__":
    main()
