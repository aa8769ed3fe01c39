"""A decode step ready to trace: a DecodeRunner with two slots of different lengths (7 and 3 prompt tokens),
grown by one token and its static buffers filled, as the runner does before each compiled step."""
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
