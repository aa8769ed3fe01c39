"""cohere_fx in one minute: compile a small built-in Cohere model, see what was rewritten, check parity, time it.

    python examples/quickstart.py              # CPU or GPU, no download (random weights, tiny config)
    python examples/quickstart.py --layers 4 --inductor
"""
import argparse
import time

import torch
from transformers import CohereForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere_config


def timed(fn, iters):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--inductor", action="store_true", help="hand the rewritten graph to inductor (slower "
                        "to compile on CPU); default: run it through aot_autograd without codegen")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = CohereForCausalLM(tiny_cohere_config(layers=args.layers)).to(device, dtype).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, args.seq), device=device)
    options = {"inductor": args.inductor}

    with torch.no_grad():
        report = cohere_fx.explain(model, ids, options=options)
    print(report)

    compiled = torch.compile(model, backend="cohere_fx", options=options)
    with torch.no_grad():
        eager_logits = model(ids).logits
        compiled_logits = compiled(ids).logits
        err = ((compiled_logits.double() - eager_logits.double()).norm() / eager_logits.double().norm()).item()
        print(f"\nparity: relative error of logits vs eager HF = {err:.2e} ({dtype}, {device})")
        eager_ms = timed(lambda: model(ids), 5)
        compiled_ms = timed(lambda: compiled(ids), 5)
    print(f"forward: eager {eager_ms:.2f} ms, cohere_fx {compiled_ms:.2f} ms (tiny model: overheads dominate; "
          f"see BENCHMARKS.md for real shapes)")
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), "parity check failed"


if __name__ == "__main__":
    main()
