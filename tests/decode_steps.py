"""Decode helpers shared by the runtime tests: HF's greedy tokens for one prompt alone (what the runner and the
engine must reproduce), and a decode step ready to trace: a DecodeRunner with two slots of different lengths
(7 and 3 prompt tokens), grown by one token and its static buffers filled, as the runner does before each
compiled step."""
import torch
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from cohere_fx.runtime import DecodeRunner
from cohere_fx.runtime.decode_runner import decode_step


def two_slot_step(model):
    """(runner, bucket) for ``model``; trace ``decode_step(model, bucket.view, bucket.input_ids,
    bucket.position_ids)``."""
    runner = DecodeRunner(model, max_batch=2, max_seq_len=16, block_size=4, compile=False)
    for slot, n in ((0, 7), (1, 3)):
        runner.prefill(slot, torch.randint(3, 128, (n,)))
    runner.cache.grow([0, 1], 1)
    bucket = runner._bucket(2)
    runner._fill(bucket, [0, 1], torch.tensor([5, 9]))
    return runner, bucket


@torch.no_grad()
def hf_greedy(model, prompt, new_tokens, stops=None):
    """The tokens HF greedy ``generate`` appends to ``prompt`` [T] alone. ``stops``: the eos ids to stop at
    (None: the model's generation config; () : the config's too, as HF reads an empty list as unset)."""
    kwargs = {} if stops is None else {"eos_token_id": list(stops) or None, "pad_token_id": 0}
    out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], do_sample=False,
                         max_new_tokens=new_tokens, **kwargs)
    return out[0, len(prompt):].tolist()


def tiny_models():
    """Two-layer Cohere and Cohere2 (fp32, CPU): what the decode fusions' pattern tests trace."""
    torch.manual_seed(0)
    return (CohereForCausalLM(tiny_cohere_config(layers=2, initializer_range=0.2)).eval(),
            Cohere2ForCausalLM(tiny_cohere2_config(layers=2, initializer_range=0.2)).eval())


def decode_step_args(model) -> tuple:
    """``decode_step``'s arguments for ``two_slot_step``'s bucket."""
    _, bucket = two_slot_step(model)
    return model, bucket.view, bucket.input_ids, bucket.position_ids


def explain_decode_step(model, **explain_kwargs):
    """(``cohere_fx.explain`` of ``two_slot_step``'s decode step, that step's arguments)."""
    args = decode_step_args(model)
    with torch.no_grad():
        return cohere_fx.explain(decode_step, *args, **explain_kwargs), args


def assert_compiled_step_equals_eager(args, **options):
    """The step compiled with cohere_fx (no inductor; ``options`` added) gives eager's logits; the pools are
    restored in between, as both steps write the new token's K and V."""
    view = args[1]
    pools = [p.clone() for p in view.k_pools + view.v_pools]
    with torch.no_grad():
        eager = decode_step(*args)
        for live, saved in zip(view.k_pools + view.v_pools, pools):
            live.copy_(saved)
        compiled = torch.compile(decode_step, backend="cohere_fx", fullgraph=True, options={"inductor": False, **options})(*args)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
