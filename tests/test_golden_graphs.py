"""Golden rewritten graphs. A failing diff is read first; accept an intended change with EXPECTTEST_ACCEPT=1.

The text is ``cohere_fx``'s own graph printout (no file paths, parameters by their module path), so it is
stable for the pinned torch and transformers versions (see README: supported versions).
"""
import pytest
import torch
import transformers

PINNED = ("2.13.0", "5.17.0")
if (torch.__version__.split("+")[0], transformers.__version__) != PINNED:  # before the import of expecttest, which
    # only the pinned test environment has (the GPU image does not)
    pytest.skip(f"golden graphs are recorded for torch {PINNED[0]} and transformers {PINNED[1]}",
                allow_module_level=True)

import expecttest  # noqa: E402
from transformers import Cohere2ForCausalLM, CohereForCausalLM  # noqa: E402

import cohere_fx  # noqa: E402
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config  # noqa: E402


def _rewritten(model, seq_len):
    torch.manual_seed(0)
    with torch.no_grad():
        report = cohere_fx.explain(model.eval(), torch.randint(3, 128, (2, seq_len)))
    (graph,) = report.graphs
    return report.table() + "\n" + graph.after


def _rewritten_decode_step():
    """The runner's decode step for two slots of a one-layer Cohere: the pools are written in place and read by
    paged_attention; no gather of a pool, no SDPA."""
    from cohere_fx.runtime.decode_runner import decode_step
    from decode_steps import two_slot_step

    torch.manual_seed(0)
    model = CohereForCausalLM(tiny_cohere_config(layers=1)).eval()
    _, bucket = two_slot_step(model)
    with torch.no_grad():
        report = cohere_fx.explain(decode_step, model, bucket.view, bucket.input_ids, bucket.position_ids)
    (graph,) = report.graphs
    return report.table() + "\n" + graph.after


class TestGoldenGraphs(expecttest.TestCase):
    def test_cohere_decode_step(self):
        self.assertExpectedInline(_rewritten_decode_step(), """\
pattern               matches
--------------------  -------
qk_norm_rope                1
rope                        0
paged_attention             1
rope_kv_write               1
causal_attention            0
sliding_attention           0
embedding                   1
layer_norm                  2
swiglu                      1
parallel_residual           1
linear_cross_entropy        0
scaled_cross_entropy        0
lora_shared_input           0
lora_shrink                 0
lora_expand                 0
swiglu_lora_shrink          0
decode_linear               4
decode_residual             1
graph 0: 141 nodes -> 46 nodes
graph(
        view_seq_lens: i32[2],
        input_ids: i64[2, 1],
        model.model.embed_tokens.weight: f32[128, 64],
        position_ids: i64[2, 1],
        model.model.rotary_emb.inv_freq: f32[8],
        model.model.layers.0.input_layernorm.weight: f32[64],
        model.model.layers.0.self_attn.q_proj.weight: f32[64, 64],
        model.model.layers.0.self_attn.k_proj.weight: f32[32, 64],
        model.model.layers.0.self_attn.v_proj.weight: f32[32, 64],
        model.model.layers.0.self_attn.q_norm.weight: f32[4, 16],
        model.model.layers.0.self_attn.k_norm.weight: f32[2, 16],
        view_k_pools_0: f32[9, 4, 2, 16],
        view_write_slots_full_attention: i64[2],
        view_v_pools_0: f32[9, 4, 2, 16],
        view_block_tables_full_attention: i32[2, 4],
        model.model.layers.0.self_attn.o_proj.weight: f32[64, 64],
        model.model.layers.0.mlp.gate_proj.weight: f32[256, 64],
        model.model.layers.0.mlp.up_proj.weight: f32[256, 64],
        model.model.layers.0.mlp.down_proj.weight: f32[64, 256],
        model.model.norm.weight: f32[64],
):
    embedding_1: f32[2, 1, 64] = cohere_fx.embedding(input_ids, model.model.embed_tokens.weight, 0)
    getitem_2: f32[1, 8, 1] = model.model.rotary_emb.inv_freq[None, :, None]
    float_1: f32[1, 8, 1] = getitem_2.to(torch.float32)
    inv_freq_expanded: f32[2, 8, 1] = float_1.expand(2, -1, 1)
    getitem_3: i64[2, 1, 1] = position_ids[:, None, :]
    position_ids_expanded: f32[2, 1, 1] = getitem_3.to(torch.float32)
    float_3: f32[2, 8, 1] = inv_freq_expanded.to(torch.float32)
    float_4: f32[2, 1, 1] = position_ids_expanded.to(torch.float32)
    matmul: f32[2, 8, 1] = float_3 @ float_4
    freqs: f32[2, 1, 8] = matmul.transpose(1, 2)
    emb: f32[2, 1, 16] = torch.repeat_interleave(freqs, 2, dim=-1)
    cos: f32[2, 1, 16] = emb.cos()
    cos_1: f32[2, 1, 16] = cos * 1.0
    sin: f32[2, 1, 16] = emb.sin()
    sin_1: f32[2, 1, 16] = sin * 1.0
    cos_2: f32[2, 1, 16] = cos_1.to(torch.float32)
    sin_2: f32[2, 1, 16] = sin_1.to(torch.float32)
    _log_api_usage_once = torch._C._log_api_usage_once('python.nn_module')
    layer_norm: f32[2, 1, 64] = cohere_fx.layer_norm(embedding_1, model.model.layers.0.input_layernorm.weight, 1e-05)
    decode_linear: (f32[2, 1, 64], f32[2, 1, 32], f32[2, 1, 32], f32[2, 1, 256], f32[2, 1, 256]) = cohere_fx.decode_linear(layer_norm, [model.model.layers.0.self_attn.q_proj.weight, model.model.layers.0.self_attn.k_proj.weight, model.model.layers.0.self_attn.v_proj.weight, model.model.layers.0.mlp.gate_proj.weight, model.model.layers.0.mlp.up_proj.weight])
    getitem_17: f32[2, 1, 64] = decode_linear[0]
    getitem_18: f32[2, 1, 32] = decode_linear[1]
    getitem_19: f32[2, 1, 32] = decode_linear[2]
    getitem_20: f32[2, 1, 256] = decode_linear[3]
    getitem_21: f32[2, 1, 256] = decode_linear[4]
    query_states: f32[2, 1, 4, 16] = getitem_17.view((2, 1, -1, 16))
    key_states: f32[2, 1, 2, 16] = getitem_18.view((2, 1, -1, 16))
    value_states: f32[2, 1, 2, 16] = getitem_19.view((2, 1, -1, 16))
    value_states_1: f32[2, 2, 1, 16] = value_states.transpose(1, 2)
    rope_kv_write: f32[2, 4, 1, 16] = cohere_fx.rope_kv_write(query_states, key_states, value_states_1, cos_2, sin_2, model.model.layers.0.self_attn.q_norm.weight, model.model.layers.0.self_attn.k_norm.weight, 1e-05, view_k_pools_0, view_v_pools_0, view_write_slots_full_attention)
    getitem_16: f32[2, 4, 16] = rope_kv_write[:, :, 0]
    paged_attention: f32[2, 4, 16] = cohere_fx.paged_attention(getitem_16, view_k_pools_0, view_v_pools_0, view_block_tables_full_attention, view_seq_lens, 0.25, 0)
    unsqueeze_2: f32[2, 4, 1, 16] = paged_attention.unsqueeze(2)
    transpose_6: f32[2, 1, 4, 16] = unsqueeze_2.transpose(1, 2)
    attn_output_1: f32[2, 1, 4, 16] = transpose_6.contiguous()
    reshape_2: f32[2, 1, 64] = attn_output_1.reshape(2, 1, -1)
    attn_output_2: f32[2, 1, 64] = reshape_2.contiguous()
    swiglu: f32[2, 1, 256] = cohere_fx.swiglu(getitem_20, getitem_21)
    decode_residual: f32[2, 1, 64] = cohere_fx.decode_residual(embedding_1, attn_output_2, model.model.layers.0.self_attn.o_proj.weight, swiglu, model.model.layers.0.mlp.down_proj.weight)
    layer_norm_1: f32[2, 1, 64] = cohere_fx.layer_norm(decode_residual, model.model.norm.weight, 1e-05)
    getitem_14: f32[2, 1, 64] = layer_norm_1[:, 0:, :]
    decode_linear_3: (f32[2, 1, 128]) = cohere_fx.decode_linear(getitem_14, [model.model.embed_tokens.weight])
    getitem_24: f32[2, 1, 128] = decode_linear_3[0]
    logits_1: f32[2, 1, 128] = getitem_24 * 0.25
    getitem_15: f32[2, 128] = logits_1[:, -1]
    float_7: f32[2, 128] = getitem_15.to(torch.float32)
    return (float_7,)
""")

    def test_cohere_one_layer(self):
        self.assertExpectedInline(_rewritten(CohereForCausalLM(tiny_cohere_config(layers=1)), 8), """\
pattern               matches
--------------------  -------
qk_norm_rope                1
rope                        0
paged_attention             0
rope_kv_write               0
causal_attention            1
sliding_attention           0
embedding                   1
layer_norm                  2
swiglu                      1
parallel_residual           1
linear_cross_entropy        0
scaled_cross_entropy        0
lora_shared_input           0
lora_shrink                 0
lora_expand                 0
swiglu_lora_shrink          0
decode_linear               4
decode_residual             1
graph 0: 136 nodes -> 53 nodes
graph(
        args_0: i64[2, 8],
        model.embed_tokens.weight: f32[128, 64],
        model.rotary_emb.inv_freq: f32[8],
        model.layers.0.input_layernorm.weight: f32[64],
        model.layers.0.self_attn.q_proj.weight: f32[64, 64],
        model.layers.0.self_attn.k_proj.weight: f32[32, 64],
        model.layers.0.self_attn.v_proj.weight: f32[32, 64],
        model.layers.0.self_attn.q_norm.weight: f32[4, 16],
        model.layers.0.self_attn.k_norm.weight: f32[2, 16],
        model.layers.0.self_attn.o_proj.weight: f32[64, 64],
        model.layers.0.mlp.gate_proj.weight: f32[256, 64],
        model.layers.0.mlp.up_proj.weight: f32[256, 64],
        model.layers.0.mlp.down_proj.weight: f32[64, 256],
        model.norm.weight: f32[64],
):
    embedding_1: f32[2, 8, 64] = cohere_fx.embedding(args_0, model.embed_tokens.weight, 0)
    arange: i64[8] = torch.arange(8, device=device('cpu'))
    position_ids: i64[8] = arange + 0
    position_ids_1: i64[1, 8] = position_ids.unsqueeze(0)
    batch_arange: i64[2] = torch.arange(2, device=device('cpu'))
    head_arange: i64[1] = torch.arange(1, device=device('cpu'))
    getitem_4: f32[1, 8, 1] = model.rotary_emb.inv_freq[None, :, None]
    float_1: f32[1, 8, 1] = getitem_4.to(torch.float32)
    inv_freq_expanded: f32[1, 8, 1] = float_1.expand(1, -1, 1)
    getitem_5: i64[1, 1, 8] = position_ids_1[:, None, :]
    position_ids_expanded: f32[1, 1, 8] = getitem_5.to(torch.float32)
    float_3: f32[1, 8, 1] = inv_freq_expanded.to(torch.float32)
    float_4: f32[1, 1, 8] = position_ids_expanded.to(torch.float32)
    matmul: f32[1, 8, 8] = float_3 @ float_4
    freqs: f32[1, 8, 8] = matmul.transpose(1, 2)
    emb: f32[1, 8, 16] = torch.repeat_interleave(freqs, 2, dim=-1)
    cos: f32[1, 8, 16] = emb.cos()
    cos_1: f32[1, 8, 16] = cos * 1.0
    sin: f32[1, 8, 16] = emb.sin()
    sin_1: f32[1, 8, 16] = sin * 1.0
    cos_2: f32[1, 8, 16] = cos_1.to(torch.float32)
    sin_2: f32[1, 8, 16] = sin_1.to(torch.float32)
    _log_api_usage_once = torch._C._log_api_usage_once('python.nn_module')
    layer_norm: f32[2, 8, 64] = cohere_fx.layer_norm(embedding_1, model.layers.0.input_layernorm.weight, 1e-05)
    decode_linear: (f32[2, 8, 64], f32[2, 8, 32], f32[2, 8, 32], f32[2, 8, 256], f32[2, 8, 256]) = cohere_fx.decode_linear(layer_norm, [model.layers.0.self_attn.q_proj.weight, model.layers.0.self_attn.k_proj.weight, model.layers.0.self_attn.v_proj.weight, model.layers.0.mlp.gate_proj.weight, model.layers.0.mlp.up_proj.weight])
    getitem_13: f32[2, 8, 64] = decode_linear[0]
    getitem_14: f32[2, 8, 32] = decode_linear[1]
    getitem_15: f32[2, 8, 32] = decode_linear[2]
    getitem_16: f32[2, 8, 256] = decode_linear[3]
    getitem_17: f32[2, 8, 256] = decode_linear[4]
    query_states: f32[2, 8, 4, 16] = getitem_13.view((2, 8, -1, 16))
    key_states: f32[2, 8, 2, 16] = getitem_14.view((2, 8, -1, 16))
    value_states: f32[2, 8, 2, 16] = getitem_15.view((2, 8, -1, 16))
    value_states_1: f32[2, 2, 8, 16] = value_states.transpose(1, 2)
    qk_norm_rope: (f32[2, 4, 8, 16], f32[2, 2, 8, 16]) = cohere_fx.qk_norm_rope(query_states, key_states, cos_2, sin_2, model.layers.0.self_attn.q_norm.weight, model.layers.0.self_attn.k_norm.weight, 1e-05)
    qk_norm_rope_k: f32[2, 2, 8, 16] = qk_norm_rope[1]
    qk_norm_rope_q: f32[2, 4, 8, 16] = qk_norm_rope[0]
    tensor: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    tensor_1: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    keys: f32[2, 2, 8, 16] = torch.cat([tensor, qk_norm_rope_k], dim=-2)
    values: f32[2, 2, 8, 16] = torch.cat([tensor_1, value_states_1], dim=-2)
    causal_attention: f32[2, 4, 8, 16] = torch.nn.functional.scaled_dot_product_attention(qk_norm_rope_q, keys, values, attn_mask=None, dropout_p=0.0, scale=0.25, is_causal=True, enable_gqa=True)
    transpose_4: f32[2, 8, 4, 16] = causal_attention.transpose(1, 2)
    attn_output_1: f32[2, 8, 4, 16] = transpose_4.contiguous()
    reshape_2: f32[2, 8, 64] = attn_output_1.reshape(2, 8, -1)
    attn_output_2: f32[2, 8, 64] = reshape_2.contiguous()
    swiglu: f32[2, 8, 256] = cohere_fx.swiglu(getitem_16, getitem_17)
    decode_residual: f32[2, 8, 64] = cohere_fx.decode_residual(embedding_1, attn_output_2, model.layers.0.self_attn.o_proj.weight, swiglu, model.layers.0.mlp.down_proj.weight)
    layer_norm_1: f32[2, 8, 64] = cohere_fx.layer_norm(decode_residual, model.norm.weight, 1e-05)
    getitem_12: f32[2, 8, 64] = layer_norm_1[:, 0:, :]
    decode_linear_3: (f32[2, 8, 128]) = cohere_fx.decode_linear(getitem_12, [model.embed_tokens.weight])
    getitem_20: f32[2, 8, 128] = decode_linear_3[0]
    logits_1: f32[2, 8, 128] = getitem_20 * 0.25
    return (values, keys, logits_1)
""")

    def test_cohere2_four_layers(self):
        self.assertExpectedInline(_rewritten(Cohere2ForCausalLM(tiny_cohere2_config(layers=4)), 8), """\
pattern               matches
--------------------  -------
qk_norm_rope                0
rope                        3
paged_attention             0
rope_kv_write               0
causal_attention            1
sliding_attention           3
embedding                   1
layer_norm                  5
swiglu                      4
parallel_residual           4
linear_cross_entropy        0
scaled_cross_entropy        0
lora_shared_input           0
lora_shrink                 0
lora_expand                 0
swiglu_lora_shrink          0
decode_linear              13
decode_residual             4
graph 0: 316 nodes -> 140 nodes
graph(
        args_0: i64[2, 8],
        model.embed_tokens.weight: f32[128, 64],
        model.rotary_emb.inv_freq: f32[8],
        model.layers.0.input_layernorm.weight: f32[64],
        model.layers.0.self_attn.q_proj.weight: f32[64, 64],
        model.layers.0.self_attn.k_proj.weight: f32[32, 64],
        model.layers.0.self_attn.v_proj.weight: f32[32, 64],
        model.layers.0.self_attn.o_proj.weight: f32[64, 64],
        model.layers.0.mlp.gate_proj.weight: f32[256, 64],
        model.layers.0.mlp.up_proj.weight: f32[256, 64],
        model.layers.0.mlp.down_proj.weight: f32[64, 256],
        model.layers.1.input_layernorm.weight: f32[64],
        model.layers.1.self_attn.q_proj.weight: f32[64, 64],
        model.layers.1.self_attn.k_proj.weight: f32[32, 64],
        model.layers.1.self_attn.v_proj.weight: f32[32, 64],
        model.layers.1.self_attn.o_proj.weight: f32[64, 64],
        model.layers.1.mlp.gate_proj.weight: f32[256, 64],
        model.layers.1.mlp.up_proj.weight: f32[256, 64],
        model.layers.1.mlp.down_proj.weight: f32[64, 256],
        model.layers.2.input_layernorm.weight: f32[64],
        model.layers.2.self_attn.q_proj.weight: f32[64, 64],
        model.layers.2.self_attn.k_proj.weight: f32[32, 64],
        model.layers.2.self_attn.v_proj.weight: f32[32, 64],
        model.layers.2.self_attn.o_proj.weight: f32[64, 64],
        model.layers.2.mlp.gate_proj.weight: f32[256, 64],
        model.layers.2.mlp.up_proj.weight: f32[256, 64],
        model.layers.2.mlp.down_proj.weight: f32[64, 256],
        model.layers.3.input_layernorm.weight: f32[64],
        model.layers.3.self_attn.q_proj.weight: f32[64, 64],
        model.layers.3.self_attn.k_proj.weight: f32[32, 64],
        model.layers.3.self_attn.v_proj.weight: f32[32, 64],
        model.layers.3.self_attn.o_proj.weight: f32[64, 64],
        model.layers.3.mlp.gate_proj.weight: f32[256, 64],
        model.layers.3.mlp.up_proj.weight: f32[256, 64],
        model.layers.3.mlp.down_proj.weight: f32[64, 256],
        model.norm.weight: f32[64],
):
    embedding_1: f32[2, 8, 64] = cohere_fx.embedding(args_0, model.embed_tokens.weight, 0)
    tensor: i64[] = torch.tensor(4, dtype=torch.int64)
    tensor_1: i64[] = torch.tensor(4, dtype=torch.int64)
    tensor_2: i64[] = torch.tensor(4, dtype=torch.int64)
    arange: i64[8] = torch.arange(8, device=device('cpu'))
    position_ids: i64[8] = arange + 0
    position_ids_1: i64[1, 8] = position_ids.unsqueeze(0)
    batch_arange: i64[2] = torch.arange(2, device=device('cpu'))
    head_arange: i64[1] = torch.arange(1, device=device('cpu'))
    batch_arange_1: i64[2] = torch.arange(2, device=device('cpu'))
    head_arange_1: i64[1] = torch.arange(1, device=device('cpu'))
    getitem_8: f32[1, 8, 1] = model.rotary_emb.inv_freq[None, :, None]
    float_1: f32[1, 8, 1] = getitem_8.to(torch.float32)
    inv_freq_expanded: f32[1, 8, 1] = float_1.expand(1, -1, 1)
    getitem_9: i64[1, 1, 8] = position_ids_1[:, None, :]
    position_ids_expanded: f32[1, 1, 8] = getitem_9.to(torch.float32)
    float_3: f32[1, 8, 1] = inv_freq_expanded.to(torch.float32)
    float_4: f32[1, 1, 8] = position_ids_expanded.to(torch.float32)
    matmul: f32[1, 8, 8] = float_3 @ float_4
    freqs: f32[1, 8, 8] = matmul.transpose(1, 2)
    emb: f32[1, 8, 16] = torch.repeat_interleave(freqs, 2, dim=-1)
    cos: f32[1, 8, 16] = emb.cos()
    cos_1: f32[1, 8, 16] = cos * 1.0
    sin: f32[1, 8, 16] = emb.sin()
    sin_1: f32[1, 8, 16] = sin * 1.0
    cos_2: f32[1, 8, 16] = cos_1.to(torch.float32)
    sin_2: f32[1, 8, 16] = sin_1.to(torch.float32)
    layer_norm: f32[2, 8, 64] = cohere_fx.layer_norm(embedding_1, model.layers.0.input_layernorm.weight, 1e-05)
    decode_linear: (f32[2, 8, 64], f32[2, 8, 32], f32[2, 8, 32], f32[2, 8, 256], f32[2, 8, 256]) = cohere_fx.decode_linear(layer_norm, [model.layers.0.self_attn.q_proj.weight, model.layers.0.self_attn.k_proj.weight, model.layers.0.self_attn.v_proj.weight, model.layers.0.mlp.gate_proj.weight, model.layers.0.mlp.up_proj.weight])
    getitem_37: f32[2, 8, 64] = decode_linear[0]
    getitem_38: f32[2, 8, 32] = decode_linear[1]
    getitem_39: f32[2, 8, 32] = decode_linear[2]
    getitem_40: f32[2, 8, 256] = decode_linear[3]
    getitem_41: f32[2, 8, 256] = decode_linear[4]
    view: f32[2, 8, 4, 16] = getitem_37.view((2, 8, -1, 16))
    view_1: f32[2, 8, 2, 16] = getitem_38.view((2, 8, -1, 16))
    view_2: f32[2, 8, 2, 16] = getitem_39.view((2, 8, -1, 16))
    value_states: f32[2, 2, 8, 16] = view_2.transpose(1, 2)
    rope: (f32[2, 4, 8, 16], f32[2, 2, 8, 16]) = cohere_fx.rope(view, view_1, cos_2, sin_2)
    rope_k: f32[2, 2, 8, 16] = rope[1]
    rope_q: f32[2, 4, 8, 16] = rope[0]
    tensor_3: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    tensor_4: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    to_9: i64[] = tensor.to(device('cpu'))
    full_key_states: f32[2, 2, 8, 16] = torch.cat([tensor_3, rope_k], dim=-2)
    full_value_states: f32[2, 2, 8, 16] = torch.cat([tensor_4, value_states], dim=-2)
    getitem_14: f32[2, 2, 3, 16] = full_key_states[:, :, -3:, :]
    getitem_15: f32[2, 2, 3, 16] = full_value_states[:, :, -3:, :]
    sliding_attention: f32[2, 4, 8, 16] = cohere_fx.ops.sliding_attention.sliding_window_attention(rope_q, full_key_states, full_value_states, 4, 0.25, True)
    transpose_4: f32[2, 8, 4, 16] = sliding_attention.transpose(1, 2)
    attn_output_1: f32[2, 8, 4, 16] = transpose_4.contiguous()
    reshape_2: f32[2, 8, 64] = attn_output_1.reshape(2, 8, -1)
    attn_output_2: f32[2, 8, 64] = reshape_2.contiguous()
    swiglu: f32[2, 8, 256] = cohere_fx.swiglu(getitem_40, getitem_41)
    decode_residual: f32[2, 8, 64] = cohere_fx.decode_residual(embedding_1, attn_output_2, model.layers.0.self_attn.o_proj.weight, swiglu, model.layers.0.mlp.down_proj.weight)
    layer_norm_1: f32[2, 8, 64] = cohere_fx.layer_norm(decode_residual, model.layers.1.input_layernorm.weight, 1e-05)
    decode_linear_3: (f32[2, 8, 64], f32[2, 8, 32], f32[2, 8, 32], f32[2, 8, 256], f32[2, 8, 256]) = cohere_fx.decode_linear(layer_norm_1, [model.layers.1.self_attn.q_proj.weight, model.layers.1.self_attn.k_proj.weight, model.layers.1.self_attn.v_proj.weight, model.layers.1.mlp.gate_proj.weight, model.layers.1.mlp.up_proj.weight])
    getitem_44: f32[2, 8, 64] = decode_linear_3[0]
    getitem_45: f32[2, 8, 32] = decode_linear_3[1]
    getitem_46: f32[2, 8, 32] = decode_linear_3[2]
    getitem_47: f32[2, 8, 256] = decode_linear_3[3]
    getitem_48: f32[2, 8, 256] = decode_linear_3[4]
    view_3: f32[2, 8, 4, 16] = getitem_44.view((2, 8, -1, 16))
    view_4: f32[2, 8, 2, 16] = getitem_45.view((2, 8, -1, 16))
    view_5: f32[2, 8, 2, 16] = getitem_46.view((2, 8, -1, 16))
    value_states_1: f32[2, 2, 8, 16] = view_5.transpose(1, 2)
    rope_1: (f32[2, 4, 8, 16], f32[2, 2, 8, 16]) = cohere_fx.rope(view_3, view_4, cos_2, sin_2)
    rope_1_k: f32[2, 2, 8, 16] = rope_1[1]
    rope_1_q: f32[2, 4, 8, 16] = rope_1[0]
    tensor_5: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    tensor_6: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    to_15: i64[] = tensor_1.to(device('cpu'))
    full_key_states_1: f32[2, 2, 8, 16] = torch.cat([tensor_5, rope_1_k], dim=-2)
    full_value_states_1: f32[2, 2, 8, 16] = torch.cat([tensor_6, value_states_1], dim=-2)
    getitem_22: f32[2, 2, 3, 16] = full_key_states_1[:, :, -3:, :]
    getitem_23: f32[2, 2, 3, 16] = full_value_states_1[:, :, -3:, :]
    sliding_attention_1: f32[2, 4, 8, 16] = cohere_fx.ops.sliding_attention.sliding_window_attention(rope_1_q, full_key_states_1, full_value_states_1, 4, 0.25, True)
    transpose_8: f32[2, 8, 4, 16] = sliding_attention_1.transpose(1, 2)
    attn_output_5: f32[2, 8, 4, 16] = transpose_8.contiguous()
    reshape_5: f32[2, 8, 64] = attn_output_5.reshape(2, 8, -1)
    attn_output_6: f32[2, 8, 64] = reshape_5.contiguous()
    swiglu_1: f32[2, 8, 256] = cohere_fx.swiglu(getitem_47, getitem_48)
    decode_residual_1: f32[2, 8, 64] = cohere_fx.decode_residual(decode_residual, attn_output_6, model.layers.1.self_attn.o_proj.weight, swiglu_1, model.layers.1.mlp.down_proj.weight)
    layer_norm_2: f32[2, 8, 64] = cohere_fx.layer_norm(decode_residual_1, model.layers.2.input_layernorm.weight, 1e-05)
    decode_linear_6: (f32[2, 8, 64], f32[2, 8, 32], f32[2, 8, 32], f32[2, 8, 256], f32[2, 8, 256]) = cohere_fx.decode_linear(layer_norm_2, [model.layers.2.self_attn.q_proj.weight, model.layers.2.self_attn.k_proj.weight, model.layers.2.self_attn.v_proj.weight, model.layers.2.mlp.gate_proj.weight, model.layers.2.mlp.up_proj.weight])
    getitem_51: f32[2, 8, 64] = decode_linear_6[0]
    getitem_52: f32[2, 8, 32] = decode_linear_6[1]
    getitem_53: f32[2, 8, 32] = decode_linear_6[2]
    getitem_54: f32[2, 8, 256] = decode_linear_6[3]
    getitem_55: f32[2, 8, 256] = decode_linear_6[4]
    view_6: f32[2, 8, 4, 16] = getitem_51.view((2, 8, -1, 16))
    view_7: f32[2, 8, 2, 16] = getitem_52.view((2, 8, -1, 16))
    view_8: f32[2, 8, 2, 16] = getitem_53.view((2, 8, -1, 16))
    value_states_2: f32[2, 2, 8, 16] = view_8.transpose(1, 2)
    rope_2: (f32[2, 4, 8, 16], f32[2, 2, 8, 16]) = cohere_fx.rope(view_6, view_7, cos_2, sin_2)
    rope_2_k: f32[2, 2, 8, 16] = rope_2[1]
    rope_2_q: f32[2, 4, 8, 16] = rope_2[0]
    tensor_7: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    tensor_8: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    to_21: i64[] = tensor_2.to(device('cpu'))
    full_key_states_2: f32[2, 2, 8, 16] = torch.cat([tensor_7, rope_2_k], dim=-2)
    full_value_states_2: f32[2, 2, 8, 16] = torch.cat([tensor_8, value_states_2], dim=-2)
    getitem_30: f32[2, 2, 3, 16] = full_key_states_2[:, :, -3:, :]
    getitem_31: f32[2, 2, 3, 16] = full_value_states_2[:, :, -3:, :]
    sliding_attention_2: f32[2, 4, 8, 16] = cohere_fx.ops.sliding_attention.sliding_window_attention(rope_2_q, full_key_states_2, full_value_states_2, 4, 0.25, True)
    transpose_12: f32[2, 8, 4, 16] = sliding_attention_2.transpose(1, 2)
    attn_output_9: f32[2, 8, 4, 16] = transpose_12.contiguous()
    reshape_8: f32[2, 8, 64] = attn_output_9.reshape(2, 8, -1)
    attn_output_10: f32[2, 8, 64] = reshape_8.contiguous()
    swiglu_2: f32[2, 8, 256] = cohere_fx.swiglu(getitem_54, getitem_55)
    decode_residual_2: f32[2, 8, 64] = cohere_fx.decode_residual(decode_residual_1, attn_output_10, model.layers.2.self_attn.o_proj.weight, swiglu_2, model.layers.2.mlp.down_proj.weight)
    layer_norm_3: f32[2, 8, 64] = cohere_fx.layer_norm(decode_residual_2, model.layers.3.input_layernorm.weight, 1e-05)
    decode_linear_9: (f32[2, 8, 64], f32[2, 8, 32], f32[2, 8, 32], f32[2, 8, 256], f32[2, 8, 256]) = cohere_fx.decode_linear(layer_norm_3, [model.layers.3.self_attn.q_proj.weight, model.layers.3.self_attn.k_proj.weight, model.layers.3.self_attn.v_proj.weight, model.layers.3.mlp.gate_proj.weight, model.layers.3.mlp.up_proj.weight])
    getitem_58: f32[2, 8, 64] = decode_linear_9[0]
    getitem_59: f32[2, 8, 32] = decode_linear_9[1]
    getitem_60: f32[2, 8, 32] = decode_linear_9[2]
    getitem_61: f32[2, 8, 256] = decode_linear_9[3]
    getitem_62: f32[2, 8, 256] = decode_linear_9[4]
    view_9: f32[2, 8, 4, 16] = getitem_58.view((2, 8, -1, 16))
    query_states_6: f32[2, 4, 8, 16] = view_9.transpose(1, 2)
    view_10: f32[2, 8, 2, 16] = getitem_59.view((2, 8, -1, 16))
    key_states_6: f32[2, 2, 8, 16] = view_10.transpose(1, 2)
    view_11: f32[2, 8, 2, 16] = getitem_60.view((2, 8, -1, 16))
    value_states_3: f32[2, 2, 8, 16] = view_11.transpose(1, 2)
    tensor_9: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    tensor_10: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    keys: f32[2, 2, 8, 16] = torch.cat([tensor_9, key_states_6], dim=-2)
    values: f32[2, 2, 8, 16] = torch.cat([tensor_10, value_states_3], dim=-2)
    causal_attention: f32[2, 4, 8, 16] = torch.nn.functional.scaled_dot_product_attention(query_states_6, keys, values, attn_mask=None, dropout_p=0.0, scale=0.25, is_causal=True, enable_gqa=True)
    transpose_16: f32[2, 8, 4, 16] = causal_attention.transpose(1, 2)
    attn_output_13: f32[2, 8, 4, 16] = transpose_16.contiguous()
    reshape_11: f32[2, 8, 64] = attn_output_13.reshape(2, 8, -1)
    attn_output_14: f32[2, 8, 64] = reshape_11.contiguous()
    swiglu_3: f32[2, 8, 256] = cohere_fx.swiglu(getitem_61, getitem_62)
    decode_residual_3: f32[2, 8, 64] = cohere_fx.decode_residual(decode_residual_2, attn_output_14, model.layers.3.self_attn.o_proj.weight, swiglu_3, model.layers.3.mlp.down_proj.weight)
    layer_norm_4: f32[2, 8, 64] = cohere_fx.layer_norm(decode_residual_3, model.norm.weight, 1e-05)
    getitem_36: f32[2, 8, 64] = layer_norm_4[:, 0:, :]
    decode_linear_12: (f32[2, 8, 128]) = cohere_fx.decode_linear(getitem_36, [model.embed_tokens.weight])
    getitem_65: f32[2, 8, 128] = decode_linear_12[0]
    logits_1: f32[2, 8, 128] = getitem_65 * 0.25
    return (to_9, getitem_15, getitem_14, to_15, getitem_23, getitem_22, to_21, getitem_31, getitem_30, values, keys, logits_1)
""")
