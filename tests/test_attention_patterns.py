"""The attention-side fusions: qk_norm_rope, rope, causal_attention, sliding_attention — counts, parity, and
what must be left alone (padding masks, half-split RoPE, global NoPE layers)."""
import pytest
import torch
import transformers.models.cohere.modeling_cohere as modeling_cohere
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from parity import assert_training_parity, rel_err


def _counts(model, ids, **kwargs):
    with torch.no_grad():
        return cohere_fx.explain(model, ids, **kwargs).matches


def test_counts_with_qk_norm():
    m = _counts(CohereForCausalLM(tiny_cohere_config(layers=3, use_qk_norm=True)), torch.randint(3, 128, (2, 7)))
    assert (m["qk_norm_rope"], m["rope"], m["causal_attention"], m["layer_norm"]) == (3, 0, 3, 4)


def test_counts_without_qk_norm():
    m = _counts(CohereForCausalLM(tiny_cohere_config(layers=3, use_qk_norm=False)), torch.randint(3, 128, (2, 7)))
    assert (m["qk_norm_rope"], m["rope"], m["causal_attention"]) == (0, 3, 3)


def test_cohere2_rope_only_on_sliding_layers():
    # window >= sequence: every mask is plain causal, so all 8 layers take the flash path; RoPE on 6 of 8
    model = Cohere2ForCausalLM(tiny_cohere2_config(layers=8, sliding_window=16))
    m = _counts(model, torch.randint(3, 128, (2, 9)))
    assert (m["rope"], m["causal_attention"], m["sliding_attention"]) == (6, 8, 0)


def test_cohere2_window_shorter_than_sequence_inference():
    model = Cohere2ForCausalLM(tiny_cohere2_config(layers=4, sliding_window=4)).eval()
    ids = torch.randint(3, 128, (2, 20))
    m = _counts(model, ids)
    assert (m["rope"], m["causal_attention"], m["sliding_attention"]) == (3, 1, 3)
    with torch.no_grad():
        out = torch.compile(model, backend="cohere_fx", options={"inductor": False})(ids).logits
        assert rel_err(out, model(ids).logits) < 1e-5


def test_cohere2_window_shorter_than_sequence_training_on_cpu_keeps_the_mask():
    """flex_attention has no CPU backward: the sliding layers keep SDPA with their mask, and say why."""
    model = Cohere2ForCausalLM(tiny_cohere2_config(layers=4, sliding_window=4))
    ids = torch.randint(3, 128, (2, 20))
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches["sliding_attention"] == 0 and report.matches["rope"] == 3
    assert len(report.near_misses["sliding_attention"]) == 3
    assert "no CPU backward" in report.near_misses["sliding_attention"][0]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_training_parity_head_dims(head_dim):
    model = CohereForCausalLM(tiny_cohere_config(layers=2, heads=2, kv_heads=1, head_dim=head_dim))
    assert_training_parity(model, torch.randint(3, 128, (2, 6)), {"inductor": False}, tol=1e-5)


def test_left_padded_batch_keeps_its_mask_and_stays_exact():
    model = CohereForCausalLM(tiny_cohere_config(layers=2))
    ids = torch.randint(3, 128, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    report = cohere_fx.explain(model, ids, attention_mask=mask, labels=ids)
    assert report.matches["causal_attention"] == 0 and report.matches["qk_norm_rope"] == 2
    assert any("padding" in why for why in report.near_misses["causal_attention"])
    assert_training_parity(model, ids, {"inductor": False}, tol=1e-5, attention_mask=mask)


def _half_split_rotate(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def test_half_split_rope_is_not_matched(monkeypatch):
    monkeypatch.setattr(modeling_cohere, "rotate_half", _half_split_rotate)
    model = CohereForCausalLM(tiny_cohere_config(layers=2, use_qk_norm=False))
    ids = torch.randint(3, 128, (2, 8))
    m = _counts(model, ids)
    assert m["rope"] == 0 and m["qk_norm_rope"] == 0
    assert_training_parity(model, ids, {"inductor": False}, tol=1e-5)


def test_compiled_greedy_decode_matches_eager():
    model = CohereForCausalLM(tiny_cohere_config(layers=2)).eval()
    ids = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
        model.forward = torch.compile(model.forward, backend="cohere_fx", options={"inductor": False})
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
