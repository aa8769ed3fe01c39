"""swiglu_lora_shrink's fused backward over its launch configs, beside the unfused kernels it replaces, at the r7b
LoRA step's down_proj shapes (4096 tokens, intermediate 14336, rank 16, bf16). CUDA-graph timed, each call on
other copies of its [tokens, 14336] operands (~256 MB per replay) so that they stream from HBM as in a step.

The unfused backward is what the compiled LoRA step ran: SwiGLU recomputed, lora_shrink's backward (dh @ A and
dA), the sum of act's two gradients, SwiGLU's backward. GB/s counts the fused kernel's intermediate-sized
traffic (dact, gate and up read; dgate and dup written) for both, so the unfused row shows what its extra passes
cost.

    python benchmarks/sweep_swiglu_lora_shrink.py [--out DIR] [BLOCK_M,BLOCK_N,WARPS,STAGES ...]
"""
import argparse
import itertools

import torch
import triton.testing

from cohere_fx.kernels import swiglu_lora_shrink as fused
from cohere_fx.kernels.lora import lora_shrink_bwd
from cohere_fx.kernels.swiglu import swiglu_bwd, swiglu_fwd

from sweep_record import write_sweep_record

M, N, RANK = 4096, 14336, 16


def unfused(dact, dh, gate, up, a):
    dx, da = lora_shrink_bwd(dh, swiglu_fwd(gate, up), a)
    return (*swiglu_bwd(dact + dx, gate, up), da)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="*")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    # by default the tiles that compile for sm_90 without spilling (128-255 registers; (64, 64, 4) and every
    # BLOCK_M 128 spill), each at the pipelining depths that ran best
    tiles = [(32, 32, 4), (32, 64, 4), (32, 64, 8), (64, 32, 4), (64, 64, 8), (16, 64, 4), (16, 128, 4)]
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs] or [
        (*tile, stages) for tile, stages in itertools.product(tiles, [2, 3])]
    torch.manual_seed(0)
    big = lambda: torch.randn(M, N, device="cuda").bfloat16()  # noqa: E731
    copies = max(1, (256 << 20) // (3 * M * N * 2))
    sets = [(big(), torch.randn(M, RANK, device="cuda"), big(), big(), torch.randn(RANK, N, device="cuda") / N ** 0.5)
            for _ in range(copies)]
    want = unfused(*sets[0])
    nbytes = 5 * M * N * 2

    def timed(fn):
        ms = triton.testing.do_bench_cudagraph(lambda: [fn(*s) for s in sets]) / len(sets)
        return ms * 1e3, nbytes / ms / 1e6

    rows = []
    us, gbs = timed(unfused)
    rows.append({"config": "unfused", "us": us, "gb_s": gbs})
    print(f"unfused (swiglu fwd, lora_shrink bwd, add, swiglu bwd)  {us:7.1f} us {gbs:6.0f} GB/s", flush=True)
    saved = fused.CONFIG
    for config in configs:
        fused.CONFIG = config
        try:
            got = fused.swiglu_lora_shrink_bwd(*sets[0])
            same = min((g == w).float().mean().item() for g, w in zip(got[:2], want[:2]))
            da_err = ((got[2].double() - want[2].double()).norm() / want[2].double().norm()).item()
            assert same > 0.999 and da_err < 1e-5, f"dgate/dup equal {same:.4f}, dA rel err {da_err:.1e}"
            us, gbs = timed(fused.swiglu_lora_shrink_bwd)
            rows.append({"config": list(config), "us": us, "gb_s": gbs})
            print(f"fused BLOCK_M {config[0]:3d} BLOCK_N {config[1]:3d} warps {config[2]} stages {config[3]}"
                  f"  {us:7.1f} us {gbs:6.0f} GB/s", flush=True)
        except Exception as e:  # noqa: BLE001 - a config the GPU cannot run is reported, not fatal
            rows.append({"config": list(config), "error": f"{type(e).__name__}: {str(e)[:80]}"})
            print(f"fused {config}: {type(e).__name__}: {str(e)[:80]}", flush=True)
        finally:
            fused.CONFIG = saved
    print(write_sweep_record(args.out, "swiglu_lora_shrink", rows))


if __name__ == "__main__":
    main()
