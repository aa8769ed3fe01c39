"""DecodeRunner: greedy tokens equal HF generate for each prompt alone while slots of different lengths decode
together (eager step, compiled step, inductor), no recompiles at a fixed bucket, errors that name the slot and
change nothing, and on a GPU 1000 CUDA-graph steps."""
import pytest
import torch
from transformers import Cohere2ForCausalLM, CohereForCausalLM

from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from cohere_fx.runtime import DecodeRunner, OutOfBlocksError
from decode_steps import hf_greedy

# No inductor (CPU codegen is slow) and only the paged_attention rewrite: every other fused op would run in
# Triton's interpreter too (tests/test_paged_attention_pattern.py compiles the step with all patterns).
NO_INDUCTOR = {"inductor": False, "passes": ["paged_attention"]}


def tiny_model(kind: str, layers: int | None = None, device: str = "cpu"):
    torch.manual_seed(0)
    if kind == "cohere":
        config = tiny_cohere_config(layers=layers or 2, initializer_range=0.2)
        return CohereForCausalLM(config).to(device).eval()
    config = tiny_cohere2_config(layers=layers or 4, sliding_window=4, initializer_range=0.2)  # 3 sliding, 1 full
    return Cohere2ForCausalLM(config).to(device).eval()


def run_greedy(runner, plan, new_tokens):
    """``plan``: (slot, prompt, first decode step at which it joins). Slots join at different steps, each stops
    after ``new_tokens`` tokens; returns each slot's tokens."""
    tokens = {slot: [] for slot, _, _ in plan}
    step = 0
    while any(len(t) < new_tokens for t in tokens.values()):
        for slot, prompt, join in plan:
            if join == step:
                tokens[slot].append(int(runner.prefill(slot, prompt).argmax()))
        live = [s for s, _, join in plan if join < step + 1 and 0 < len(tokens[s]) < new_tokens]
        if live:
            logits = runner.decode(live, torch.tensor([tokens[s][-1] for s in live]))
            assert logits.shape == (len(live), runner.vocab_size) and logits.dtype == torch.float32
            for s, row in zip(live, logits):
                tokens[s].append(int(row.argmax()))
        step += 1
    return tokens


@pytest.mark.parametrize("compile", [False, True], ids=["eager_step", "compiled_step"])
@pytest.mark.parametrize("kind", ["cohere", "cohere2"])
def test_greedy_tokens_equal_hf_generate_alone(kind, compile):
    model = tiny_model(kind)
    new_tokens = 10  # Cohere2: the window is 4, so sliding layers recycle pages
    plan = [(2, torch.randint(3, 128, (5,)), 0), (0, torch.randint(3, 128, (9,)), 0),
            (3, torch.randint(3, 128, (3,)), 3)]  # slot 3 joins late: batches 2 and 3 (buckets 2 and 4)
    runner = DecodeRunner(model, max_batch=4, max_seq_len=32, block_size=4, compile=compile, options=NO_INDUCTOR)
    got = run_greedy(runner, plan, new_tokens)
    for slot, prompt, _ in plan:
        assert got[slot] == hf_greedy(model, prompt, new_tokens), f"slot {slot}"
        assert runner.length(slot) == len(prompt) + new_tokens - 1


def test_freed_slot_is_reused_with_same_tokens():
    model = tiny_model("cohere2")
    runner = DecodeRunner(model, max_batch=2, max_seq_len=32, block_size=2, compile=False)
    prompt, other = torch.randint(3, 128, (6,)), torch.randint(3, 128, (4,))
    first = run_greedy(runner, [(0, prompt, 0), (1, other, 0)], 8)
    free_before = runner.free_blocks()
    runner.free(0)
    assert runner.length(0) == 0 and runner.free_blocks() > free_before
    again = run_greedy(runner, [(0, prompt, 0)], 8)
    assert again[0] == first[0]


def test_inductor_step_writes_pools_in_place():
    """The inductor-compiled step (one layer: CPU codegen is slow) gives the eager step's tokens, and its code
    hands the pools themselves to rope_kv_write, which stores the new K/V (a mutating op: inductor must re-inplace
    its functionalized form), and to paged_attention: no copy of a pool. On a GPU this runs on torch 2.11's
    inductor, which once copied a whole pool for a write through a view."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model("cohere", layers=1)
    prompt = torch.randint(3, 128, (5,))
    eager = run_greedy(DecodeRunner(model, max_batch=2, max_seq_len=16, block_size=4, compile=False),
                       [(1, prompt, 0)], 4)
    runner = DecodeRunner(model, max_batch=2, max_seq_len=16, block_size=4, compile=True)
    token = int(runner.prefill(1, prompt).argmax())
    logits, (code,) = run_and_get_code(runner.decode, [1], torch.tensor([token]))
    tokens = [token, int(logits.argmax())]
    while len(tokens) < 4:
        tokens.append(int(runner.decode([1], torch.tensor([tokens[-1]])).argmax()))
    assert tokens == eager[1]
    assert code.count("torch.ops.cohere_fx.paged_attention.default(") == 1
    assert code.count("torch.ops.cohere_fx.rope_kv_write.default(") == 1
    assert ".copy_(" not in code and "aten.index." not in code
    assert str(runner.cache.layers[0].k_pool.numel()) not in code  # no loop over a whole pool


def test_no_recompiles_over_many_steps():
    from torch._dynamo.utils import counters

    model = tiny_model("cohere")
    runner = DecodeRunner(model, max_batch=2, max_seq_len=64, block_size=4, options=NO_INDUCTOR)
    graphs = counters["stats"]["unique_graphs"]
    runner.warmup((1,))
    assert counters["stats"]["unique_graphs"] == graphs + 1  # the step is one graph, compiled by warmup
    graphs, frames = counters["stats"]["unique_graphs"], dict(counters["frames"])
    token = int(runner.prefill(0, torch.randint(3, 128, (5,))).argmax())
    for _ in range(51):
        token = int(runner.decode([0], torch.tensor([token])).argmax())
    assert counters["stats"]["unique_graphs"] == graphs and dict(counters["frames"]) == frames
    assert runner.length(0) == 5 + 51


def test_out_of_blocks_names_the_slot_and_changes_nothing():
    model = tiny_model("cohere")
    runner = DecodeRunner(model, max_batch=3, max_seq_len=32, block_size=4, num_blocks=6, compile=False)
    assert runner.free_blocks() == 6
    runner.prefill(0, torch.randint(3, 128, (8,)))  # 2 pages
    runner.prefill(1, torch.randint(3, 128, (12,)))  # 3 pages: one left
    tables = {k: p.table.clone() for k, p in runner.cache.page_tables.items()}
    pools = [layer.k_pool.clone() for layer in runner.cache.layers]
    assert runner.blocks_needed(0, 1) == 1 and runner.blocks_needed(1, 5) == 2 and runner.free_blocks() == 1
    with pytest.raises(OutOfBlocksError, match="sequence 1") as err:  # slot 0 would get the last page, 1 none
        runner.decode([0, 1], torch.tensor([5, 6]))
    assert err.value.seq == 1
    with pytest.raises(OutOfBlocksError, match="sequence 2") as err:
        runner.prefill(2, torch.randint(3, 128, (5,)))
    assert err.value.seq == 2
    assert [runner.length(s) for s in range(3)] == [8, 12, 0] and runner.free_blocks() == 1
    assert all(torch.equal(p.table, tables[k]) for k, p in runner.cache.page_tables.items())
    assert all(torch.equal(layer.k_pool, pool) for layer, pool in zip(runner.cache.layers, pools))
    runner.free(1)
    assert runner.free_blocks() == 4
    runner.decode([0], torch.tensor([6]))
    assert runner.length(0) == 9 and runner.free_blocks() == 3


def test_bad_requests_are_clear_errors():
    model = tiny_model("cohere")
    runner = DecodeRunner(model, max_batch=2, max_seq_len=8, block_size=4, compile=False)
    with pytest.raises(ValueError, match="longer than max_seq_len=8"):
        runner.prefill(0, torch.randint(3, 128, (9,)))
    assert runner.length(0) == 0 and runner.free_blocks() == 4
    runner.prefill(0, torch.randint(3, 128, (8,)))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        runner.decode([0], torch.tensor([3]))
    with pytest.raises(ValueError, match="is empty"):
        runner.decode([1], torch.tensor([3]))
    with pytest.raises(ValueError, match="not empty"):
        runner.prefill(0, torch.randint(3, 128, (2,)))
    with pytest.raises(ValueError, match="not distinct"):
        runner.decode([0, 0], torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="not in 0 .. 1"):
        runner.prefill(2, torch.randint(3, 128, (2,)))
    eager = tiny_model("cohere")
    eager.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="sdpa"):
        DecodeRunner(eager)


@pytest.mark.gpu
def test_cuda_graphs_1000_steps_no_recompiles():
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    model = tiny_model("cohere2", device="cuda")
    prompts = [torch.randint(3, 128, (n,)) for n in (7, 30)]

    def runner(cuda_graphs):
        r = DecodeRunner(model, max_batch=4, max_seq_len=1100, block_size=16, cuda_graphs=cuda_graphs)
        return r, [int(r.prefill(slot, p).argmax()) for slot, p in enumerate(prompts)]

    plain, tokens = runner(False)
    logits, codes = run_and_get_code(plain.decode, [0, 1], torch.tensor(tokens, device="cuda"))
    for layer in plain.cache.layers:  # the K/V writes stay in place: no kernel over a whole pool
        assert not any(f"xnumel = {layer.k_pool.numel()}" in code for code in codes)
    reference = [logits.argmax(-1).tolist()]
    for _ in range(31):
        reference.append(plain.decode([0, 1], torch.tensor(reference[-1], device="cuda")).argmax(-1).tolist())
    graphed, tokens = runner(True)
    graphs = None
    for step in range(1000):
        next_tokens = graphed.decode([0, 1], torch.tensor(tokens, device="cuda")).argmax(-1)
        tokens = next_tokens.tolist()
        if step < 32:
            assert tokens == reference[step], f"step {step}"
        if step == 0:
            graphs, frames = counters["stats"]["unique_graphs"], dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] == graphs and dict(counters["frames"]) == frames
    assert graphed.length(1) == 30 + 1000


@pytest.mark.parametrize("kind", ["cohere", "cohere2"])
@pytest.mark.parametrize("max_prefill_tokens", [64, 12], ids=["one_forward", "split"])
def test_prefill_batch_equals_prefill_alone(kind, max_prefill_tokens):
    """Prompts of different lengths prefilled together (right-padded; Cohere2's window of 4 is shorter than some
    prompts, so those go alone or with prompts of their length) give each prompt's own logits, keep only their
    own pages, and decode HF's greedy tokens."""
    model = tiny_model(kind)
    lengths = [3, 7, 3, 7, 2]  # Cohere2: the two 7s (past the window) share a forward, the rest another
    prompts = [torch.randint(3, 128, (n,)) for n in lengths]
    alone = DecodeRunner(model, max_batch=5, max_seq_len=32, block_size=2, compile=False)
    want = torch.stack([alone.prefill(slot, p) for slot, p in enumerate(prompts)])
    runner = DecodeRunner(model, max_batch=5, max_seq_len=32, block_size=2, compile=False,
                          max_prefill_tokens=max_prefill_tokens)
    slots = [4, 0, 2, 1, 3]
    got = runner.prefill_batch(slots, prompts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert [runner.length(s) for s in slots] == lengths
    assert runner.free_blocks() == alone.free_blocks()
    for table, ref in zip(runner.cache.page_tables.values(), alone.cache.page_tables.values()):
        assert [len(table.pages[s]) for s in slots] == [len(ref.pages[s]) for s in range(5)]
    tokens = {s: [int(row.argmax())] for s, row in zip(slots, got)}
    for _ in range(5):
        logits = runner.decode(slots, torch.tensor([tokens[s][-1] for s in slots]))
        for s, row in zip(slots, logits):
            tokens[s].append(int(row.argmax()))
    for slot, prompt in zip(slots, prompts):
        assert tokens[slot] == hf_greedy(model, prompt, 6), f"slot {slot}"


def test_prefill_groups_respect_token_budget_window_and_pages():
    model = tiny_model("cohere2")  # window 4
    runner = DecodeRunner(model, max_batch=6, max_seq_len=32, block_size=2, compile=False, max_prefill_tokens=12)
    lengths = [3, 6, 2, 6, 4, 3]
    groups = runner._prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) == 1 or len(group) * longest <= 12
        assert longest <= 4 or len({lengths[i] for i in group}) == 1  # past the window: one length only
    assert [sorted(g) for g in groups] == [[0, 2, 5], [4], [1, 3]]
    few = DecodeRunner(model, max_batch=6, max_seq_len=32, block_size=2, num_blocks=5, compile=False)
    assert few._prefill_groups([4, 4, 4]) == [[0, 1], [2]]  # 2 pages each: a third would not fit beside them


def test_prefill_batch_refuses_bad_input_and_changes_nothing():
    runner = DecodeRunner(tiny_model("cohere"), max_batch=3, max_seq_len=8, block_size=2, compile=False)
    free = runner.free_blocks()
    with pytest.raises(ValueError, match="distinct slots"):
        runner.prefill_batch([0, 0], [torch.tensor([5, 6]), torch.tensor([7])])
    with pytest.raises(ValueError, match="longer than max_seq_len=8"):
        runner.prefill_batch([0, 1], [torch.tensor([5, 6]), torch.arange(3, 12)])
    assert runner.free_blocks() == free and runner.length(0) == runner.length(1) == 0
