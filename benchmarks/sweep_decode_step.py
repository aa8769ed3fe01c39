"""The whole decode step over launch configs of its weight-streaming kernels: what a config is worth where the
kernel runs between the others, not alone. (In a profiled Command-R7B batch-16 step the grouped q/k/v/gate/up
launch took ~102 us a layer, where sweep_decode_linear.py's 2.92 TB/s for it alone is 97.7 us:
benchmarks/results/profile-decode-command-r7b-b16-h100-20261206T1551.log, README's footnote 5.)

    python benchmarks/sweep_decode_step.py [--preset command-r7b] [--batch 16] [--prompt 512] [--steps 64]
        [--grouped 16,256,4,2,0 32,256,4,2,0 ...] [--single ...] [--head ...] [--out DIR]

Each config is (BLOCK_N, BLOCK_K, num_warps, num_stages, UPCAST) of decode_linear's grouped launch (``--grouped``),
of decode_residual (``--single``, o and down) or of the head (``--head``); one kind is varied at a time, the others
keep their defaults. Per config: the module's constant is set, a DecodeRunner is built (the compiled step is reused,
its CUDA graph captured anew, so the new config is in it), ``batch`` random prompts are prefilled, and ``steps``
greedy decode steps are timed as the runner runs them (graph replay plus its host work). The defaults run first and
last: their difference is the run's drift. Prints a table; writes decode_step-sweep-<date>.json to DIR.
"""
import argparse
import time

import torch

import cohere_fx.ops  # noqa: F401
from cohere_fx.bench.models import build_model, config_for
from cohere_fx.kernels import decode_linear, decode_residual
from cohere_fx.runtime import DecodeRunner

from sweep_record import write_sweep_record

KINDS = {  # kind -> (module, constant)
    "grouped": (decode_linear, "GROUPED_CONFIG"),
    "single": (decode_residual, "CONFIG"),
    "head": (decode_linear, "HEAD_CONFIG"),
}


def parse_config(text: str) -> tuple:
    block_n, block_k, warps, stages, upcast = (int(v) for v in text.split(","))
    return block_n, block_k, warps, stages, bool(upcast)


def time_steps(model, batch: int, prompt: int, steps: int, device) -> float:
    """Seconds per decode step of ``batch`` sequences after a ``prompt``-token prefill (a fresh runner)."""
    runner = DecodeRunner(model, max_batch=batch, max_seq_len=prompt + steps + 4)
    gen = torch.Generator().manual_seed(0)
    slots = list(range(batch))
    prompts = [torch.randint(3, model.config.vocab_size, (prompt,), generator=gen).to(device) for _ in slots]
    tokens = runner.prefill_batch(slots, prompts).argmax(-1)
    for _ in range(3):  # the first captures the bucket's CUDA graph
        tokens = runner.decode(slots, tokens).argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        tokens = runner.decode(slots, tokens).argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="command-r7b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="benchmarks/results")
    for kind in KINDS:
        parser.add_argument(f"--{kind}", nargs="*", default=[], type=parse_config, metavar="N,K,WARPS,STAGES,UPCAST")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model(config_for(args.preset), device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    runs = [("default", None)] + [(kind, c) for kind in KINDS for c in getattr(args, kind)] + [("default", None)]
    rows = []
    for kind, config in runs:
        module, name = KINDS.get(kind, (None, None))
        saved = getattr(module, name) if module else None
        if module:
            setattr(module, name, config)
        try:
            seconds = time_steps(model, args.batch, args.prompt, args.steps, device)
        finally:
            if module:
                setattr(module, name, saved)
        if config is None:  # the defaults, all kinds
            config = {k: getattr(m, n) for k, (m, n) in KINDS.items()}
        rows.append({"kind": kind, "config": config, "ms_per_step": seconds * 1e3,
                     "decode_tok_s": args.batch / seconds, "preset": args.preset, "batch": args.batch,
                     "prompt": args.prompt, "steps": args.steps})
        print(f"{kind:8s} {str(config):28s} {seconds * 1e3:8.3f} ms/step {args.batch / seconds:9.1f} tok/s",
              flush=True)
    if device.type == "cuda":
        print(write_sweep_record(args.out, "decode_step", rows))


if __name__ == "__main__":
    main()
