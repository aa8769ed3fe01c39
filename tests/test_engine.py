"""The continuous-batching engine on the real DecodeRunner (CPU, tiny fp32 Cohere and Cohere2).

Greedy tokens of every request must equal HF greedy ``generate`` for that prompt alone, whatever joined or left
the batch meanwhile; sampled tokens must depend on the prompt and seed only; pages that run out make a request
wait (or fail alone); bad input is refused with an error naming the request.
"""
import dataclasses
import math

import pytest
import torch
from transformers import Cohere2ForCausalLM, CohereForCausalLM

from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from cohere_fx.runtime import Engine, RequestError, SamplingParams
from cohere_fx.runtime.decode_runner import DecodeRunner
from cohere_fx.runtime.sampling import make_generator, sample_tokens

import decode_steps

EOS = 2  # the tiny configs' eos_token_id
GREEDY = SamplingParams(max_new_tokens=12)


def _model(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


# initializer_range 0.3: greedy continuations of random weights that vary from token to token (at the default
# 0.02 they repeat one token, which would hide tokens handed to the wrong request).
MODELS = {
    "cohere": lambda: _model(CohereForCausalLM, tiny_cohere_config(initializer_range=0.3)),
    "cohere2": lambda: _model(Cohere2ForCausalLM, tiny_cohere2_config(initializer_range=0.3)),  # window 4
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def cohere():
    return MODELS["cohere"]()


def prompts(*lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(EOS + 1, 128, (n,), generator=gen) for n in lengths]


def hf_greedy(model, prompt, new, stops=(EOS,)):
    return decode_steps.hf_greedy(model, prompt, new, stops)


def engine(model, **kwargs):
    return Engine(model, **{"max_batch": 3, "max_seq_len": 64, "block_size": 8, "compile": False, **kwargs})


def run_steps(eng, outputs, history, steps=None):
    """step() ``steps`` times (default: until the engine is empty), adding to ``outputs`` {request_id: [outputs]}
    and to ``history`` one (request ids that moved, requests running afterwards) per step."""
    while not eng.idle if steps is None else steps > 0:
        step = eng.step()
        history.append(([o.request_id for o in step], eng.num_running))
        for o in step:
            outputs.setdefault(o.request_id, []).append(o)
        steps = None if steps is None else steps - 1
    return outputs


def drain(eng) -> dict:
    return run_steps(eng, {}, [])


def assert_empty(eng, free_before):
    assert eng.idle and eng.num_running == eng.num_waiting == 0
    assert all(eng.runner.length(slot) == 0 for slot in range(eng.runner.max_batch))
    assert eng.runner.free_blocks() == free_before


def test_greedy_equals_hf_with_requests_joining_and_leaving(model):
    eng = engine(model, block_size=16)
    free = eng.runner.free_blocks()
    specs = list(zip(prompts(3, 9, 5, 12, 7, 2), (4, 10, 7, 1, 12, 9)))
    ids, history, outputs = {}, [], {}
    for first in (0, 2, 4):  # two requests, two steps, two more, ...: they join while others decode
        for prompt, new in specs[first:first + 2]:
            ids[eng.add_request(prompt, SamplingParams(max_new_tokens=new))] = (prompt, new)
        run_steps(eng, outputs, history, steps=2)
    run_steps(eng, outputs, history)
    for request_id, (prompt, new) in ids.items():
        outs = outputs[request_id]
        tokens = [o.token for o in outs]
        assert tokens == hf_greedy(model, prompt, new), request_id
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason == ("stop" if tokens[-1] == EOS else "length")
        assert outs[-1].finish_reason == "stop" or len(tokens) == new
    last_step = {i: max(s for s, (moved, _) in enumerate(history) if i in moved) for i in ids}
    assert len(set(last_step.values())) > 2  # requests left at different steps
    assert max(running for _, running in history) == 3  # and shared the batch, up to max_batch
    assert_empty(eng, free)


def test_stop_tokens(model):
    (prompt,) = prompts(6, seed=3)
    free_run = hf_greedy(model, prompt, 12, stops=())
    stop = free_run[4]
    cut = free_run.index(stop) + 1
    eng = engine(model)
    no_stop, custom, default = eng.generate([prompt] * 3, [SamplingParams(max_new_tokens=12, stop_token_ids=()),
                                                           SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)),
                                                           GREEDY])
    assert no_stop == free_run
    assert custom == free_run[:cut] == hf_greedy(model, prompt, 12, stops=(stop,))
    assert default == hf_greedy(model, prompt, 12)
    assert Engine(model, max_batch=1, max_seq_len=32, compile=False).stop_token_ids == (EOS,)
    assert Engine(model, stop_token_ids=[7, 9], max_batch=1, max_seq_len=32, compile=False).stop_token_ids == (7, 9)


def test_decode_tokens_are_read_one_step_late(cohere):
    """A step launches its decode before reading back the tokens of the decode the step before launched, so the
    host work of one step overlaps the device work of the last: the prefill's token comes in the step that admits
    the request, the first decoded token two steps later, and the request goes idle when the last one is read."""
    (p,) = prompts(5, seed=4)
    eng = Engine(cohere, max_batch=2, max_seq_len=32, block_size=4, compile=False)
    free = eng.runner.free_blocks()
    eng.add_request(p, SamplingParams(max_new_tokens=3, stop_token_ids=()))
    steps = [[o.token for o in eng.step()] for _ in range(4)]
    want = hf_greedy(cohere, p, 3, stops=())
    assert steps == [want[:1], [], want[1:2], want[2:]]
    assert_empty(eng, free)


def test_compiled_runner(cohere):
    eng = engine(cohere, max_batch=2, compile=True, options={"inductor": False})
    batch = prompts(4, 11)
    params = SamplingParams(max_new_tokens=8, stop_token_ids=())  # both decode every step: one bucket compiles
    assert eng.generate(batch, params) == [hf_greedy(cohere, p, 8, stops=()) for p in batch]


def test_sampling_reproducible_and_independent_of_the_batch(model):
    p, q, r = prompts(5, 8, 3, seed=4)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    alone = engine(model).generate([p], sampled)[0]
    eng = engine(model, max_batch=2)  # p shares batches with different requests, joining at other steps
    mixed = eng.generate([q, p, r, p], [GREEDY, sampled, SamplingParams(max_new_tokens=5, temperature=1.0, seed=8),
                                        dataclasses.replace(sampled, seed=8)])
    assert mixed[1] == alone
    assert eng.generate([p], sampled)[0] == alone  # the seed, not the engine's history, decides
    assert mixed[3] != alone  # another seed, other tokens (fixed seeds: deterministic)
    assert alone != hf_greedy(model, p, 12, stops=())[:len(alone)]
    tiny_top_p = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=3)
    assert eng.generate([p, q], tiny_top_p) == [hf_greedy(model, p, 12), hf_greedy(model, q, 12)]


def test_sampler_distribution():
    """Frequencies over 4000 seeds match softmax(logits / T) renormalised over the top-p nucleus."""
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4).clone()
    n = logits.shape[0]

    def frequencies(params):
        tokens = sample_tokens(logits, [params] * n, [make_generator(s) for s in range(n)]).tolist()
        return torch.bincount(torch.tensor(tokens), minlength=4).double() / n

    hot = probs.sqrt() / probs.sqrt().sum()  # temperature 2
    assert torch.allclose(frequencies(SamplingParams(temperature=2.0, seed=0)), hot.double(), atol=0.03)
    # top_p 0.7: 0.5 and 0.3 make the nucleus (the mass before 0.3 is 0.5 < 0.7, before 0.15 it is 0.8)
    nucleus = torch.tensor([0.0, 0.5, 0.0, 0.3], dtype=torch.float64) / 0.8
    assert torch.allclose(frequencies(SamplingParams(temperature=1.0, top_p=0.7, seed=0)), nucleus, atol=0.03)
    greedy = frequencies(SamplingParams(temperature=0.0))
    assert greedy.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_stream(model):
    p, a, b = prompts(7, 4, 9, seed=5)
    eng = engine(model)
    free = eng.runner.free_blocks()
    ids = {eng.add_request(a, SamplingParams(max_new_tokens=6)): (a, 6), eng.add_request(b, GREEDY): (b, 12)}
    streamed = list(eng.stream(p, GREEDY))  # a and b decode alongside
    assert streamed == hf_greedy(model, p, 12) == eng.generate([p], GREEDY)[0]
    others = drain(eng)  # what a and b produced while the stream drove the engine is delivered, not lost
    assert {i: [o.token for o in outs] for i, outs in others.items()} == {
        i: hf_greedy(model, prompt, new) for i, (prompt, new) in ids.items()}
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11)
    assert list(eng.stream(p, sampled)) == eng.generate([p], sampled)[0]
    tokens = eng.stream(p, GREEDY)
    next(tokens), next(tokens)
    tokens.close()  # closing early aborts the request: slot and pages back
    assert_empty(eng, free)


def test_out_of_pages_request_waits_then_completes(cohere):
    # 6 pages of 4 tokens; each request caches 8 + 8 - 1 = 15 tokens (4 pages): only one fits at a time
    eng = engine(cohere, block_size=4, num_blocks=6)
    free = eng.runner.free_blocks()
    params = SamplingParams(max_new_tokens=8, stop_token_ids=())
    first, second = prompts(8, 8, seed=6)
    ids = [eng.add_request(first, params), eng.add_request(second, params)]
    history = []
    outputs = run_steps(eng, {}, history)
    moved = [m for m, _ in history]
    assert moved[0] == [ids[0]]  # the second waits...
    first_done = max(s for s, m in enumerate(moved) if ids[0] in m)
    assert moved[first_done + 1] == [ids[1]]  # ...and joins the step after the first left
    for request_id, prompt in zip(ids, (first, second)):
        assert [o.token for o in outputs[request_id]] == hf_greedy(cohere, prompt, 8, stops=())
    assert_empty(eng, free)


def test_cohere2_admits_what_fits_per_layer_kind():
    model = MODELS["cohere2"]()
    eng = engine(model, block_size=4)  # full layers: 48 pages of 4 tokens; sliding layers (window 4): 6
    for prompt in prompts(12, 12, 12):  # 12 + 12 - 1 tokens: 6 full-layer pages, 2 sliding-layer pages each
        eng.add_request(prompt, GREEDY)
    eng.step()
    assert eng.num_running == 3


class OptimisticPages:
    """The real runner, but reporting that a sequence's future growth costs no pages, so the engine admits
    requests whose lives do not fit together. The real runner with the engine's admission rule cannot get
    there: this is the way to make running requests run out of pages mid-flight."""

    def __init__(self, runner):
        self.runner = runner

    def blocks_needed(self, slot, new_tokens):
        return self.runner.blocks_needed(slot, new_tokens) if new_tokens == 1 else 0

    def __getattr__(self, name):
        return getattr(self.runner, name)


def test_running_request_out_of_pages_fails_alone(cohere):
    def make():
        return Engine(OptimisticPages(DecodeRunner(cohere, max_batch=2, max_seq_len=64, block_size=4, num_blocks=4,
                                                   compile=False)))

    # two prompts of 4 tokens (a page each); at 9 tokens both need a third page and none is left
    params = SamplingParams(max_new_tokens=9, stop_token_ids=())
    first, second = prompts(4, 4, seed=8)
    eng = make()
    ids = [eng.add_request(first, params), eng.add_request(second, params)]
    outputs = drain(eng)
    assert [o.token for o in outputs[ids[0]]] == hf_greedy(cohere, first, 9, stops=())  # its cache untouched
    failed = outputs[ids[1]][-1]
    assert failed.finished and failed.finish_reason == "error" and failed.token is None
    assert f"request {ids[1]} failed" in failed.error and "num_blocks" in failed.error
    assert [o.token for o in outputs[ids[1]][:-1]] == hf_greedy(cohere, second, 9, stops=())[:5]
    with pytest.raises(RequestError, match="request 1 failed") as info:
        make().generate([first, second], params)
    assert info.value.request_id == 1


@pytest.mark.parametrize("prompt, new, match", [
    (list(range(3, 68)), 1, "request 0: prompt of 65 tokens"),  # longer than max_seq_len 64
    (list(range(3, 60)), 8, "max_new_tokens=8 exceeds the runner's max_seq_len=64"),
    (list(range(3, 30)), 8, "caching 34 tokens needs more KV pages"),  # 6 pages of 4 tokens: 24 at most
    ([], 4, "non-empty 1-D"),
    ([[3, 4]], 4, "non-empty 1-D"),
    ([3.0, 4.0], 4, "non-empty 1-D"),
    ([3, 128], 4, r"token ids must be in \[0, 128\)"),
    ([-1, 3], 4, r"token ids must be in \[0, 128\)"),
])
def test_bad_requests(cohere, prompt, new, match):
    eng = engine(cohere, block_size=4, num_blocks=6)
    with pytest.raises(ValueError, match=match):
        eng.add_request(prompt, SamplingParams(max_new_tokens=new))
    assert eng.num_waiting == 0
    with pytest.raises(ValueError, match="request 2"):  # generate adds nothing when one prompt is refused
        eng.generate([[3, 4], prompt], SamplingParams(max_new_tokens=new))
    assert eng.num_waiting == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), "seed"), (dict(seed=1.0), "seed"), (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(stop_token_ids=("a",)), "stop_token_ids"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_engine_arguments(cohere):
    eng = engine(cohere)
    with pytest.raises(TypeError, match="runner arguments"):
        Engine(eng.runner, max_batch=2)
    eng.add_request([3, 4, 5], GREEDY)
    eng.step()
    with pytest.raises(ValueError, match="already hold sequences"):
        Engine(eng.runner)
    with pytest.raises(TypeError, match="SamplingParams"):
        eng.add_request([3, 4], {"max_new_tokens": 2})
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        eng.generate([[3], [4]], [GREEDY])


@pytest.mark.gpu
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_cuda_engine_equals_hf_greedy(arch):
    """On CUDA: the compiled decode step in CUDA graphs, the tokens copied to the host behind each decode and read
    after the next one is launched; greedy tokens still equal HF generate per prompt."""
    model = MODELS[arch]().cuda()
    eng = Engine(model, max_batch=4, max_seq_len=64, block_size=4)
    ps = [p.cuda() for p in prompts(5, 9, 3, 7, 6)]  # five requests, four slots: one joins when a slot frees
    params = [SamplingParams(max_new_tokens=n, stop_token_ids=()) for n in (12, 6, 12, 9, 10)]
    got = eng.generate(ps, params)
    assert got == [hf_greedy(model, p, n.max_new_tokens, stops=()) for p, n in zip(ps, params)]
