"""Serve several prompts at once with cohere_fx's continuous-batching engine, printing tokens as they come out.

    python examples/serve.py               # CPU or GPU, tiny random-weight Cohere, eager decode step (seconds)
    python examples/serve.py --compile     # the decode step compiled with backend="cohere_fx" (CUDA graphs on GPU)

Five requests share three slots: they join as slots free up, each with its own sampling settings; a sixth is
streamed token by token. The weights are random, so the tokens are ids, not text.
"""
import argparse
import time

import torch
from transformers import CohereForCausalLM

from cohere_fx.configs import tiny_cohere_config
from cohere_fx.runtime import Engine, SamplingParams


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="compile the decode step with the cohere_fx "
                        "backend (on CPU without inductor: aot_autograd, no codegen)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = CohereForCausalLM(tiny_cohere_config(initializer_range=0.3)).to(device).eval()
    options = {} if device == "cuda" else {"inductor": False}
    engine = Engine(model, max_batch=3, max_seq_len=128, compile=args.compile, options=options)

    gen = torch.Generator().manual_seed(1)
    requests = {  # prompt length -> how it decodes
        5: SamplingParams(max_new_tokens=12),  # greedy, stops at the model's eos
        17: SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=1),
        3: SamplingParams(max_new_tokens=20, temperature=1.2, seed=2, stop_token_ids=()),
        9: SamplingParams(max_new_tokens=8),
        30: SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.5, seed=3),
    }
    prompts = {}
    for length, params in requests.items():
        prompt = torch.randint(3, model.config.vocab_size, (length,), generator=gen)
        prompts[engine.add_request(prompt, params)] = prompt

    start, step, outputs = time.perf_counter(), 0, {i: [] for i in prompts}
    while not engine.idle:
        moved = engine.step()
        step += 1
        print(f"step {step:2d}: " + "  ".join(
            f"req {o.request_id} +{o.token}" + (f" ({o.finish_reason})" if o.finished else "") for o in moved))
        for o in moved:
            outputs[o.request_id].append(o.token)
    seconds = time.perf_counter() - start
    print(f"\n{sum(map(len, outputs.values()))} tokens for {len(prompts)} requests in {step} steps, {seconds:.2f} s")

    first = next(iter(prompts))
    with torch.no_grad():
        reference = model.generate(prompts[first][None].to(device), do_sample=False, max_new_tokens=12)
    same = reference[0, len(prompts[first]):].tolist() == outputs[first]
    print(f"request {first} (greedy) equals HF generate for its prompt alone: {same}")

    print("\nstreamed: ", end="", flush=True)
    for token in engine.stream(prompts[first], SamplingParams(max_new_tokens=16, temperature=1.0, seed=4)):
        print(token, end=" ", flush=True)
    print()
    assert same, "the engine's greedy tokens differ from HF generate"


if __name__ == "__main__":
    main()
