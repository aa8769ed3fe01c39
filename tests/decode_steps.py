"""Decode helpers shared by the runtime tests: HF's greedy tokens for one prompt alone (what the runner and the
engine must reproduce), and a decode step ready to trace: a DecodeRunner with two slots of different lengths
(7 and 3 prompt tokens), grown by one token and its static buffers filled, as the runner does before each
compiled step."""
import torch

from cohere_fx.runtime import DecodeRunner


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
