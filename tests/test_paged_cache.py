"""PagedKVCache in HF generate (greedy tokens and logits equal to DynamicCache), its pages as paged_attention reads
them, out-of-blocks behaviour, and property tests of the block allocator."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Cohere2Config, Cohere2ForCausalLM, CohereConfig, CohereForCausalLM

import cohere_fx.ops  # noqa: F401  (registers torch.ops.cohere_fx.*)
from cohere_fx.runtime import BlockAllocator, OutOfBlocksError, PagedKVCache

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, intermediate_size=128,
            attn_implementation="sdpa", initializer_range=0.2, pad_token_id=0, eos_token_id=None)


def tiny_model(kind: str):
    if kind == "cohere":
        config = CohereConfig(num_hidden_layers=2, use_qk_norm=True, **TINY)
        return CohereForCausalLM(config).eval()
    config = Cohere2Config(num_hidden_layers=4, sliding_window=4, **TINY)  # layers 0-2 sliding, 3 full (NoPE)
    return Cohere2ForCausalLM(config).eval()


@torch.no_grad()
def generate(model, input_ids, cache=None, attention_mask=None, new_tokens=12):
    out = model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=new_tokens,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits)


def assert_same_generation(model, input_ids, cache, attention_mask=None):
    ref_tokens, ref_logits = generate(model, input_ids, attention_mask=attention_mask)
    tokens, logits = generate(model, input_ids, cache, attention_mask=attention_mask)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_cohere_generate_matches_dynamic_cache():
    model = tiny_model("cohere")
    input_ids = torch.randint(1, 128, (2, 7))
    cache = PagedKVCache(model.config, num_blocks=16, block_size=4)
    assert_same_generation(model, input_ids, cache)
    assert cache.seq_lens[:2].tolist() == [18, 18]  # 7 prompt + 11 fed back (the 12th token is never cached)
    assert cache.num_free_blocks() == {"full_attention": 16 - 2 * 5}


def test_cohere2_sliding_generate_matches_dynamic_cache_and_recycles_pages():
    model = tiny_model("cohere2")
    input_ids = torch.randint(1, 128, (2, 6))
    cache = PagedKVCache(model.config, num_blocks=24, block_size=2, device="cpu", dtype=torch.float32)
    assert_same_generation(model, input_ids, cache)
    # 17 tokens cached: full layers hold all 9 blocks per sequence, sliding ones only the window's (<= 4 tokens)
    free = cache.num_free_blocks()
    assert free["full_attention"] == 24 - 2 * 9
    assert cache.layers[0].k_pool.shape[0] - free["sliding_attention"] <= 2 * 3


def test_cohere2_long_prompt_beyond_window():
    """A prompt longer than the window: sliding layers page only its last tokens."""
    model = tiny_model("cohere2")
    input_ids = torch.randint(1, 128, (1, 11))
    cache = PagedKVCache(model.config, num_blocks=16, block_size=2)
    assert_same_generation(model, input_ids, cache)


@pytest.mark.parametrize("kind", ["cohere", "cohere2"])
def test_left_padded_batch(kind):
    model = tiny_model(kind)
    lengths = [3, 8, 5]
    input_ids = torch.zeros(3, 8, dtype=torch.long)
    attention_mask = torch.zeros(3, 8, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, 8 - n:] = torch.randint(1, 128, (n,))
        attention_mask[row, 8 - n:] = 1
    cache = PagedKVCache(model.config, num_blocks=32, block_size=4)
    assert_same_generation(model, input_ids, cache, attention_mask)


def test_reset_frees_everything_and_cache_is_reusable():
    model = tiny_model("cohere2")
    input_ids = torch.randint(1, 128, (2, 5))
    cache = PagedKVCache(model.config, num_blocks=24, block_size=2)
    first, _ = generate(model, input_ids, cache)
    cache.reset()
    assert cache.num_free_blocks() == {"sliding_attention": 24, "full_attention": 24}
    assert cache.get_seq_length() == 0 and int(cache.seq_lens.abs().sum()) == 0
    second, _ = generate(model, input_ids, cache)
    assert torch.equal(first, second)


def test_pages_are_what_paged_attention_reads():
    """Drive update like a model does; at each decode step the op on the cache's pools, tables and lengths
    equals attention over the K/V that update returned (full layer, and a sliding layer past its window)."""
    config = Cohere2Config(num_hidden_layers=4, sliding_window=4, **TINY)
    cache = PagedKVCache(config, num_blocks=12, block_size=2)
    batch, heads, kv_heads, head_dim = 2, 4, 2, 16
    for t in [5] + [1] * 5:
        for layer_idx in range(4):
            k, v = torch.randn(2, batch, kv_heads, t, head_dim)
            keys, values = cache.update(k, v, layer_idx)
            if t > 1 or layer_idx not in (0, 3):
                continue
            q = torch.randn(batch, heads, head_dim)
            expected = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], keys, values, scale=0.25, enable_gqa=True)[:, :, 0]
            k_pool, v_pool, tables, lens, window = cache.paged_attention_inputs(layer_idx, batch)
            got = torch.ops.cohere_fx.paged_attention(q, k_pool, v_pool, tables, lens, 0.25, window)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_out_of_blocks_names_the_sequence_and_touches_nothing():
    config = CohereConfig(num_hidden_layers=2, **TINY)
    cache = PagedKVCache(config, num_blocks=5, block_size=4)
    k = torch.randn(2, 2, 4, 16)  # batch 2, 4 tokens: one block per sequence and step
    for _ in range(2):
        for layer_idx in range(2):
            cache.update(k, k, layer_idx)
    table, lens = cache.layers[0].pages.table.clone(), cache.seq_lens.clone()
    pools = [layer.k_pool.clone() for layer in cache.layers]
    with pytest.raises(OutOfBlocksError, match="sequence 1") as err:  # sequence 0 gets the last block, 1 cannot
        cache.update(k, k, 0)
    assert err.value.seq == 1
    assert torch.equal(cache.layers[0].pages.table, table) and torch.equal(cache.seq_lens, lens)
    assert all(torch.equal(layer.k_pool, pool) for layer, pool in zip(cache.layers, pools))
    assert cache.num_free_blocks() == {"full_attention": 1} and cache.get_seq_length() == 8
    cache.free_sequence(1)
    assert cache.num_free_blocks() == {"full_attention": 3} and cache.seq_lens[:2].tolist() == [8, 0]


def test_out_of_blocks_in_generate():
    model = tiny_model("cohere")
    cache = PagedKVCache(model.config, num_blocks=3, block_size=4)
    with pytest.raises(OutOfBlocksError, match="sequence 0"):
        generate(model, torch.randint(1, 128, (1, 6)), cache, new_tokens=10)


@st.composite
def allocator_programs(draw):
    num_blocks = draw(st.integers(1, 24))
    ops = draw(st.lists(st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 3), st.integers(0, 6)),
                        max_size=40))
    return num_blocks, ops


@settings(max_examples=150, deadline=None)
@given(allocator_programs())
def test_allocator_never_leaks_double_allocates_or_shares(program):
    """Sequences grow by random amounts and end at random times; ownership stays a partition of the pool."""
    num_blocks, ops = program
    allocator = BlockAllocator(num_blocks)
    owned: dict[int, list[int]] = {}
    for op, seq, n in ops:
        if op == "grow":
            free_before = allocator.num_free
            if n > free_before:
                with pytest.raises(OutOfBlocksError, match=f"sequence {seq}"):
                    allocator.allocate(n, seq)
                assert allocator.num_free == free_before  # a refused request changes nothing
                continue
            blocks = allocator.allocate(n, seq)
            assert len(blocks) == len(set(blocks)) == n
            owned.setdefault(seq, []).extend(blocks)
        elif seq in owned:
            allocator.free(owned.pop(seq))
        all_owned = [b for blocks in owned.values() for b in blocks]
        assert len(all_owned) == len(set(all_owned))  # no block shared or handed out twice
        assert all(0 <= b < num_blocks and allocator.is_allocated(b) for b in all_owned)
        assert len(all_owned) + allocator.num_free == num_blocks  # nothing leaked
    for blocks in owned.values():
        allocator.free(blocks)
    assert allocator.num_free == num_blocks


def test_allocator_rejects_double_free():
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(2)
    allocator.free(blocks[:1])
    with pytest.raises(ValueError, match="not allocated"):
        allocator.free(blocks)
    assert allocator.num_free == 3  # the refused call freed nothing
    with pytest.raises(ValueError, match="twice"):
        allocator.free([blocks[1], blocks[1]])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grow", "grow", "free"]), st.integers(0, 2), st.integers(1, 7)),
                max_size=30))
def test_cache_rows_never_share_leak_or_outgrow_the_window(ops):
    """Rows grow as a DecodeRunner grows them (an empty row by a prompt of t tokens, then one token per step) and
    are freed at random: for every layer kind the pages stay a partition of the pool, the device table mirrors
    them, a refused growth changes nothing, and a sliding row never holds more than its window's pages."""
    config = Cohere2Config(num_hidden_layers=4, sliding_window=4, **TINY)
    cache = PagedKVCache(config, num_blocks=10, block_size=2, device="cpu", dtype=torch.float32, max_seqs=3,
                         max_blocks_per_seq=16, num_sliding_blocks=8)

    def state():
        return ([dict(p) for pages in cache.page_tables.values() for p in pages.pages],
                [cache.length(r) for r in range(3)], cache.num_free_blocks())

    for op, row, t in ops:
        if op == "free":
            cache.free_sequence(row)
        else:
            before = state()
            try:
                cache.grow([row], t if cache.length(row) == 0 else 1)
            except OutOfBlocksError as err:
                assert err.seq == row and state() == before
        for kind, pages in cache.page_tables.items():
            owned = [b for p in pages.pages for b in p.values()]
            assert len(owned) == len(set(owned)) and len(owned) + pages.allocator.num_free == pages.allocator.num_blocks
            for r, p in enumerate(pages.pages):
                expected = torch.zeros(16, dtype=torch.int32)
                expected[list(p)] = torch.tensor(list(p.values()), dtype=torch.int32)
                assert torch.equal(pages.table[r], expected)
                if pages.window:
                    assert len(p) <= -(-4 // 2) + 1
        assert cache.seq_lens.tolist() == [cache.length(r) for r in range(3)]
