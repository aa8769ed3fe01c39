"""PEFT LoRA on all seven projections, with ``prepare_model_for_kbit_training`` and with QLoRA's 4-bit base layers:
every cohere_fx pattern of the plain model still matches, the LoRA A matrices that read one input become one GEMM
(``lora_shared_input``), and the LoRA gradients equal eager."""
import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import CohereForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere_config
from parity import rel_err

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED = "lora_shared_input"
LAYERS = 2


def _lora(model, dropout=0.0, **config):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False,
                        **config)
    return get_peft_model(model, config).train()


def _assert_counts(lora, plain, fused_groups, split_lookup=False, low_precision_layers=0):
    """Every pattern matches the LoRA model as often as the plain one; ``lora_shared_input`` fuses
    ``fused_groups`` groups there and nothing in the plain model. ``split_lookup``: ``enable_input_require_grads``
    hooks the embedding's output, Dynamo breaks the graph there and the lookup lands in a graph of its own, which
    holds no Cohere module and is left alone: no ``embedding`` match (the frozen lookup has no gradient to fix).
    ``low_precision_layers``: layers with a bf16 base and fp32 adapters, where each layer's three LoRA A GEMMs
    (the fused one, o's, down's) become lora_shrink, its seven updates lora_expand, and down's with the SwiGLU it
    reads swiglu_lora_shrink."""
    lora, plain = dict(lora.matches), dict(plain.matches)
    assert (lora.pop(FUSED), plain.pop(FUSED)) == (fused_groups, 0)
    for name, per_layer in (("lora_shrink", 3), ("lora_expand", 7), ("swiglu_lora_shrink", 1)):
        assert (lora.pop(name), plain.pop(name)) == (per_layer * low_precision_layers, 0)
    if split_lookup:
        assert (lora.pop("embedding"), plain.pop("embedding")) == (0, 1)
    assert lora == plain


def _lora_grads(model, ids, options=None):
    """Gradients of the trainable (LoRA) parameters: eager when ``options`` is None, else through cohere_fx."""
    run = model if options is None else torch.compile(model, backend="cohere_fx", options=options)
    model.zero_grad(set_to_none=True)
    run(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_grads_match(model, ids, tol, options=None):
    eager = _lora_grads(model, ids)
    compiled = _lora_grads(model, ids, {"inductor": False, **(options or {})})
    assert eager and eager.keys() == compiled.keys()
    worst = max(eager, key=lambda n: rel_err(compiled[n], eager[n]))
    assert rel_err(compiled[worst], eager[worst]) < tol, (worst, rel_err(compiled[worst], eager[worst]))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_counts_match_the_plain_model(dropout):
    """With dropout 0 each layer's q, k, v, gate and up LoRA A read the input norm's output: one group per layer.
    With dropout each reads its own dropout sample: nothing to fuse."""
    ids = torch.randint(3, 128, (2, 8))
    plain = CohereForCausalLM(tiny_cohere_config(layers=LAYERS))
    expected = cohere_fx.explain(plain, ids, labels=ids)
    report = cohere_fx.explain(_lora(plain, dropout), ids, labels=ids)
    _assert_counts(report, expected, LAYERS if dropout == 0 else 0)
    assert report.near_misses[FUSED] == []


def test_lora_gradients_match_eager_with_the_lora_a_gemms_fused():
    """k_proj gets rank 2: the split sizes show the members (q, k, v, gate, up, in graph order), and a wrong
    split would hand a LoRA B the wrong columns."""
    model = _lora(CohereForCausalLM(tiny_cohere_config(layers=LAYERS)), rank_pattern={"k_proj": 2})
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, labels=ids)
    assert report.matches[FUSED] == LAYERS
    assert str(report).count(", [4, 2, 4, 4, 4], -1)") == LAYERS
    _assert_grads_match(model, ids, tol=1e-5)


def test_bf16_model_with_fp32_adapters_fuses_through_peft_input_casts():
    """get_peft_model keeps adapters in fp32 over a bf16 model (autocast_adapter_dtype), so PEFT casts the input
    once per layer: five casts of one node, still one group. Only this pattern runs, the rest in plain torch."""
    model = _lora(CohereForCausalLM(tiny_cohere_config(layers=LAYERS)).to(torch.bfloat16))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype == torch.float32
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(model, ids, labels=ids, options={"passes": [FUSED]})
    assert report.matches[FUSED] == LAYERS
    _assert_grads_match(model, ids, tol=2e-2, options={"passes": [FUSED]})


def test_prepare_model_for_kbit_training_composes():
    """On a plain model ``prepare_model_for_kbit_training`` casts bf16 to fp32 and freezes the base; the input
    grads and gradient checkpointing it adds for a k-bit model are added here with the same calls. HF puts each
    layer in a checkpoint subgraph, where the patterns apply (causal_attention included: the mask's proof
    follows the subgraph input to the outer graph)."""
    ids = torch.randint(3, 128, (2, 8))
    plain = CohereForCausalLM(tiny_cohere_config(layers=1))
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    expected = cohere_fx.explain(plain, ids, labels=ids)
    assert expected.matches["causal_attention"] == 1

    model = prepare_model_for_kbit_training(CohereForCausalLM(tiny_cohere_config(layers=1)).to(torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = _lora(model)
    _assert_counts(cohere_fx.explain(model, ids, labels=ids), expected, 1, split_lookup=True)
    _assert_grads_match(model, ids, tol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_qlora_nf4_base_layers(device, tmp_path):
    """bitsandbytes Linear4bit (nf4) base layers, bf16 compute, fp32 adapters: the plain bf16 model's counts, one
    fused LoRA A group per layer, LoRA gradients by relative error. bitsandbytes >= 0.50 quantizes on CPU too."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    ids = torch.randint(3, 128, (2, 8), device=device)
    plain = CohereForCausalLM(tiny_cohere_config(layers=LAYERS)).to(device, torch.bfloat16)
    expected = cohere_fx.explain(plain, ids, labels=ids)
    plain.save_pretrained(tmp_path)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = CohereForCausalLM.from_pretrained(tmp_path, quantization_config=nf4, dtype=torch.bfloat16,
                                              device_map=device)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = _lora(model)
    _assert_counts(cohere_fx.explain(model, ids, labels=ids), expected, LAYERS, low_precision_layers=LAYERS)
    _assert_grads_match(model, ids, tol=3e-2)
