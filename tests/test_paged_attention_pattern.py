"""The paged_attention pattern on a traced decode step: every layer's gather + repeat_kv + SDPA becomes one
paged_attention reading the pools (with the right window per layer), nothing gathers the pools any more, the
rewritten step equals the eager one; masks that are not the cache's are left alone, with the reason."""
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from cohere_fx.runtime.decode_runner import decode_step
from cohere_fx.runtime.paged_cache import gather_pages, length_mask
from decode_steps import two_slot_step


def runner_with_two_slots(kind: str, kv_heads: int = 2):
    torch.manual_seed(0)
    if kind == "cohere":
        model = CohereForCausalLM(tiny_cohere_config(layers=2, kv_heads=kv_heads, initializer_range=0.2)).eval()
    else:
        model = Cohere2ForCausalLM(tiny_cohere2_config(layers=4, sliding_window=4, initializer_range=0.2)).eval()
    runner, bucket = two_slot_step(model)
    return model, runner, bucket


@pytest.mark.parametrize("kind,kv_heads", [("cohere", 2), ("cohere", 4), ("cohere2", 2)],
                         ids=["cohere_gqa", "cohere_mha", "cohere2"])
def test_every_layer_rewritten_and_no_pool_gather(kind, kv_heads):
    model, runner, bucket = runner_with_two_slots(kind, kv_heads)
    args = (model, bucket.view, bucket.input_ids, bucket.position_ids)
    with torch.no_grad():
        report = cohere_fx.explain(decode_step, *args)  # every registered pattern, as the runner compiles it
    assert report.matches["paged_attention"] == model.config.num_hidden_layers
    (graph,) = report.graphs
    assert "scaled_dot_product_attention" not in graph.after
    assert not re.search(r"= view_[kv]_pools_\d+\[", graph.after)  # no gather (getitem) of a pool
    calls = re.findall(r"cohere_fx\.paged_attention\(\w+, view_k_pools_(\d+), view_v_pools_\1, "
                       r"view_block_tables_(\w+), view_seq_lens, 0\.25, (\d+)\)", graph.after)
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(calls)
    assert [(kind_, int(w)) for _, kind_, w in calls] == [
        (t, 4 if t == "sliding_attention" else 0) for t in layer_types]


def test_rewritten_step_equals_eager_step():
    model, runner, bucket = runner_with_two_slots("cohere2")
    args = (model, bucket.view, bucket.input_ids, bucket.position_ids)
    pools = [p.clone() for p in bucket.view.k_pools]
    with torch.no_grad():
        eager = decode_step(*args)
        for live, saved in zip(bucket.view.k_pools, pools):  # the step rewrites the same rows: same state
            live.copy_(saved)
        compiled = torch.compile(decode_step, backend="cohere_fx", fullgraph=True,
                                 options={"inductor": False, "passes": ["paged_attention"]})(*args)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def step_with_mask(mask_fn):
    """A decode step whose attention reads the cache's gathered pages under ``mask_fn(seq_lens, kv_len)``."""
    def attention_layer(q, view):
        table = view.block_tables["full_attention"]
        k, v = gather_pages(view.k_pools[0], table), gather_pages(view.v_pools[0], table)
        mask = mask_fn(view.seq_lens, view.kv_len)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=0.25, is_causal=False)
    return attention_layer


MASKS = {  # name -> (mask, the reason it is left alone; None: rewritten)
    "cache_length_mask": (lambda lens, n: length_mask(lens, torch.arange(n)), None),
    "off_by_one": (lambda lens, n: (torch.arange(n) <= lens[:, None])[:, None, None, :],
                   "the mask is not the paged cache's length/window mask"),
    "all_visible": (lambda lens, n: torch.ones(lens.shape[0], 1, 1, n, dtype=torch.bool),
                    "the mask is not the paged cache's length/window mask"),
    "shifted_positions": (lambda lens, n: length_mask(lens, torch.arange(n) + 1),
                          "mask positions are not arange(16) over the gathered pages"),
}


@pytest.mark.parametrize("mask", list(MASKS))
def test_only_the_cache_mask_is_rewritten(mask):
    """The pattern applied to a traced attention over the gathered pages (not a Cohere model, so outside the
    pipeline's model check)."""
    from torch._inductor.pattern_matcher import stable_topological_sort

    from cohere_fx.passes.normalize import normalize_graph
    from cohere_fx.passes.pattern_pass import apply_pattern
    from cohere_fx.patterns import PATTERNS

    _, runner, bucket = runner_with_two_slots("cohere", kv_heads=4)
    mask_fn, reason = MASKS[mask]
    results = []

    def backend(gm, example_inputs):
        normalize_graph(gm.graph)
        results.append(apply_pattern(PATTERNS["paged_attention"], gm.graph))
        stable_topological_sort(gm.graph)  # as the pipeline does after its patterns
        gm.recompile()
        return gm.forward

    q = torch.randn(2, 4, 1, 16)
    out = torch.compile(step_with_mask(mask_fn), backend=backend, fullgraph=True)(q, bucket.view)
    (result,) = results
    if reason is None:
        assert result.count == 1 and not result.near_misses
        torch.testing.assert_close(out, step_with_mask(mask_fn)(q, bucket.view), atol=1e-5, rtol=1e-5)
    else:
        assert result.count == 0 and [why.split(": ", 1)[1] for _, why in result.near_misses] == [reason]
