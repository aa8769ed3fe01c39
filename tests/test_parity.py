"""Logits, loss and every parameter gradient of compiled models equal eager HF."""
import pytest
import torch
from transformers import Cohere2ForCausalLM, CohereForCausalLM

from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config
from parity import assert_training_parity, rel_err

CASES = {
    "cohere-gqa-qknorm": lambda: CohereForCausalLM(tiny_cohere_config(use_qk_norm=True, kv_heads=2)),
    "cohere-mha": lambda: CohereForCausalLM(tiny_cohere_config(use_qk_norm=False, kv_heads=4)),
    "cohere-eps0.1": lambda: CohereForCausalLM(tiny_cohere_config(layer_norm_eps=0.1)),
    "cohere2-window4": lambda: Cohere2ForCausalLM(tiny_cohere2_config(sliding_window=4)),
}
EAGER_RUN = {"inductor": False}


@pytest.mark.parametrize("case", CASES)
def test_fp32_training_parity(case):
    model = CASES[case]()
    ids = torch.randint(3, 128, (2, 12))
    assert_training_parity(model, ids, EAGER_RUN, tol=1e-5)


@pytest.mark.parametrize("case", ["cohere-gqa-qknorm", "cohere2-window4"])
def test_bf16_training_parity(case):
    model = CASES[case]().to(torch.bfloat16)
    ids = torch.randint(3, 128, (2, 12))
    # bf16 roundings differ only where fused kernels keep fp32 between steps HF rounds: a few ulp.
    assert_training_parity(model, ids, EAGER_RUN, tol=2e-2)


def test_inference_parity_no_grad_with_padding():
    model = CASES["cohere-gqa-qknorm"]().eval()
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = torch.compile(model, backend="cohere_fx", options=EAGER_RUN)(ids, attention_mask=mask).logits
    assert rel_err(out, ref) < 1e-5


@pytest.mark.slow
def test_inductor_training_parity_keeps_fx_graph_cache():
    from torch._dynamo.utils import counters

    counters.clear()
    model = CohereForCausalLM(tiny_cohere_config(layers=1))
    ids = torch.randint(3, 128, (2, 8))
    assert_training_parity(model, ids, {"inductor": True}, tol=1e-4)
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0


def test_gradient_checkpointing_layers_are_rewritten_inside_their_checkpoint():
    """HF gradient checkpointing puts each decoder layer in a torch.utils.checkpoint subgraph: the patterns
    apply inside it (the mask enters the subgraph as an input; its proof is made on the outer graph's constant
    computation), and parity holds."""
    import cohere_fx

    model = CASES["cohere-gqa-qknorm"]()
    model.gradient_checkpointing_enable()
    ids = torch.randint(3, 128, (2, 8))
    matches = cohere_fx.explain(model, ids, labels=ids).matches
    assert (matches["qk_norm_rope"], matches["layer_norm"], matches["scaled_cross_entropy"]) == (2, 3, 1)
    assert matches["causal_attention"] == 2  # the mask's proof follows the subgraph input to the outer graph
    assert_training_parity(model, ids, EAGER_RUN, tol=1e-5)
