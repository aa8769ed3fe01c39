"""Golden rewritten graphs. A failing diff is read first; accept an intended change with EXPECTTEST_ACCEPT=1.

The text is ``cohere_fx``'s own graph printout (no file paths, parameters by their module path), so it is
stable for the pinned torch and transformers versions (see README: supported versions).
"""
import expecttest
import pytest
import torch
import transformers
from transformers import Cohere2ForCausalLM, CohereForCausalLM

import cohere_fx
from cohere_fx.configs import tiny_cohere2_config, tiny_cohere_config


PINNED = ("2.13.0", "5.17.0")
pytestmark = pytest.mark.skipif(
    (torch.__version__.split("+")[0], transformers.__version__) != PINNED,
    reason=f"golden graphs are recorded for torch {PINNED[0]} and transformers {PINNED[1]}")


def _rewritten(model, seq_len):
    torch.manual_seed(0)
    with torch.no_grad():
        report = cohere_fx.explain(model.eval(), torch.randint(3, 128, (2, seq_len)))
    (graph,) = report.graphs
    return report.table() + "\n" + graph.after


class TestGoldenGraphs(expecttest.TestCase):
    def test_cohere_one_layer(self):
        self.assertExpectedInline(_rewritten(CohereForCausalLM(tiny_cohere_config(layers=1)), 8), """\
pattern     matches
----------  -------
layer_norm        2
  not matched (layer_norm): query_states_1: weight shape (4, 16) is not [hidden] (per-head norms belong to qk_norm_rope)
  not matched (layer_norm): key_states_1: weight shape (2, 16) is not [hidden] (per-head norms belong to qk_norm_rope)
graph 0: 136 nodes -> 114 nodes
graph(args_0: i64[2, 8], model.embed_tokens.weight: f32[128, 64], model.rotary_emb.inv_freq: f32[8], model.layers.0.input_layernorm.weight: f32[64], model.layers.0.self_attn.q_proj.weight: f32[64, 64], model.layers.0.self_attn.k_proj.weight: f32[32, 64], model.layers.0.self_attn.v_proj.weight: f32[32, 64], model.layers.0.self_attn.q_norm.weight: f32[4, 16], model.layers.0.self_attn.k_norm.weight: f32[2, 16], model.layers.0.self_attn.o_proj.weight: f32[64, 64], model.layers.0.mlp.gate_proj.weight: f32[256, 64], model.layers.0.mlp.up_proj.weight: f32[256, 64], model.layers.0.mlp.down_proj.weight: f32[64, 256], model.norm.weight: f32[64]):
    inputs_embeds: f32[2, 8, 64] = torch.nn.functional.embedding(args_0, model.embed_tokens.weight, 0, None, 2.0, False, False)
    arange: i64[8] = torch.arange(8, device=device('cpu'))
    position_ids: i64[8] = arange + 0
    position_ids_1: i64[1, 8] = position_ids.unsqueeze(0)
    batch_arange: i64[2] = torch.arange(2, device=device('cpu'))
    head_arange: i64[1] = torch.arange(1, device=device('cpu'))
    arange_3: i64[8] = torch.arange(8, device=device('cpu'))
    q_arange: i64[8] = arange_3 + 0
    arange_4: i64[8] = torch.arange(8, device=device('cpu'))
    kv_arange: i64[8] = arange_4 + 0
    q_indices: i64[1, 1, 8, 1] = q_arange[None, None, :, None]
    kv_indices: i64[1, 1, 1, 8] = kv_arange[None, None, None, :]
    attention_mask: b8[1, 1, 8, 8] = kv_indices <= q_indices
    attention_mask_1: b8[2, 1, 8, 8] = attention_mask.expand(2, -1, 8, 8)
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
    layer_norm: f32[2, 8, 64] = cohere_fx.layer_norm(inputs_embeds, model.layers.0.input_layernorm.weight, 1e-05)
    linear: f32[2, 8, 64] = torch.nn.functional.linear(layer_norm, model.layers.0.self_attn.q_proj.weight, None)
    query_states: f32[2, 8, 4, 16] = linear.view((2, 8, -1, 16))
    linear_1: f32[2, 8, 32] = torch.nn.functional.linear(layer_norm, model.layers.0.self_attn.k_proj.weight, None)
    key_states: f32[2, 8, 2, 16] = linear_1.view((2, 8, -1, 16))
    linear_2: f32[2, 8, 32] = torch.nn.functional.linear(layer_norm, model.layers.0.self_attn.v_proj.weight, None)
    value_states: f32[2, 8, 2, 16] = linear_2.view((2, 8, -1, 16))
    hidden_states_4: f32[2, 8, 4, 16] = query_states.to(torch.float32)
    mean_3: f32[2, 8, 4, 1] = hidden_states_4.mean(-1, keepdim=True)
    sub_2: f32[2, 8, 4, 16] = hidden_states_4 - mean_3
    pow_2: f32[2, 8, 4, 16] = sub_2.pow(2)
    variance_1: f32[2, 8, 4, 1] = pow_2.mean(-1, keepdim=True)
    sub_3: f32[2, 8, 4, 16] = hidden_states_4 - mean_3
    add_4: f32[2, 8, 4, 1] = variance_1 + 1e-05
    rsqrt_1: f32[2, 8, 4, 1] = torch.rsqrt(add_4)
    hidden_states_5: f32[2, 8, 4, 16] = sub_3 * rsqrt_1
    to_6: f32[4, 16] = model.layers.0.self_attn.q_norm.weight.to(torch.float32)
    hidden_states_6: f32[2, 8, 4, 16] = to_6 * hidden_states_5
    query_states_1: f32[2, 8, 4, 16] = hidden_states_6.to(torch.float32)
    hidden_states_7: f32[2, 8, 2, 16] = key_states.to(torch.float32)
    mean_6: f32[2, 8, 2, 1] = hidden_states_7.mean(-1, keepdim=True)
    sub_4: f32[2, 8, 2, 16] = hidden_states_7 - mean_6
    pow_3: f32[2, 8, 2, 16] = sub_4.pow(2)
    variance_2: f32[2, 8, 2, 1] = pow_3.mean(-1, keepdim=True)
    sub_5: f32[2, 8, 2, 16] = hidden_states_7 - mean_6
    add_5: f32[2, 8, 2, 1] = variance_2 + 1e-05
    rsqrt_2: f32[2, 8, 2, 1] = torch.rsqrt(add_5)
    hidden_states_8: f32[2, 8, 2, 16] = sub_5 * rsqrt_2
    to_9: f32[2, 16] = model.layers.0.self_attn.k_norm.weight.to(torch.float32)
    hidden_states_9: f32[2, 8, 2, 16] = to_9 * hidden_states_8
    key_states_1: f32[2, 8, 2, 16] = hidden_states_9.to(torch.float32)
    query_states_2: f32[2, 4, 8, 16] = query_states_1.transpose(1, 2)
    key_states_2: f32[2, 2, 8, 16] = key_states_1.transpose(1, 2)
    value_states_1: f32[2, 2, 8, 16] = value_states.transpose(1, 2)
    q: f32[2, 4, 8, 16] = query_states_2.to(torch.float32)
    k: f32[2, 2, 8, 16] = key_states_2.to(torch.float32)
    cos_3: f32[1, 1, 8, 16] = cos_2.unsqueeze(1)
    sin_3: f32[1, 1, 8, 16] = sin_2.unsqueeze(1)
    mul_8: f32[2, 4, 8, 16] = q * cos_3
    x1: f32[2, 4, 8, 8] = q[..., ::2]
    x2: f32[2, 4, 8, 8] = q[..., 1::2]
    neg: f32[2, 4, 8, 8] = -x2
    stack: f32[2, 4, 8, 8, 2] = torch.stack([neg, x1], dim=-1)
    rot_x: f32[2, 4, 8, 16] = stack.flatten(-2)
    mul_9: f32[2, 4, 8, 16] = rot_x * sin_3
    q_embed: f32[2, 4, 8, 16] = mul_8 + mul_9
    mul_10: f32[2, 2, 8, 16] = k * cos_3
    x1_1: f32[2, 2, 8, 8] = k[..., ::2]
    x2_1: f32[2, 2, 8, 8] = k[..., 1::2]
    neg_1: f32[2, 2, 8, 8] = -x2_1
    stack_1: f32[2, 2, 8, 8, 2] = torch.stack([neg_1, x1_1], dim=-1)
    rot_x_1: f32[2, 2, 8, 16] = stack_1.flatten(-2)
    mul_11: f32[2, 2, 8, 16] = rot_x_1 * sin_3
    k_embed: f32[2, 2, 8, 16] = mul_10 + mul_11
    query_states_3: f32[2, 4, 8, 16] = q_embed.to(torch.float32)
    key_states_3: f32[2, 2, 8, 16] = k_embed.to(torch.float32)
    tensor: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    tensor_1: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    keys: f32[2, 2, 8, 16] = torch.cat([tensor, key_states_3], dim=-2)
    values: f32[2, 2, 8, 16] = torch.cat([tensor_1, value_states_1], dim=-2)
    getitem_10: f32[2, 2, 1, 8, 16] = keys[:, :, None, :, :]
    hidden_states_10: f32[2, 2, 2, 8, 16] = getitem_10.expand(2, 2, 2, 8, 16)
    key: f32[2, 4, 8, 16] = hidden_states_10.reshape(2, 4, 8, 16)
    getitem_11: f32[2, 2, 1, 8, 16] = values[:, :, None, :, :]
    hidden_states_11: f32[2, 2, 2, 8, 16] = getitem_11.expand(2, 2, 2, 8, 16)
    value: f32[2, 4, 8, 16] = hidden_states_11.reshape(2, 4, 8, 16)
    attn_output: f32[2, 4, 8, 16] = torch.nn.functional.scaled_dot_product_attention(query_states_3, key, value, attn_mask=attention_mask_1, dropout_p=0.0, scale=0.25, is_causal=False)
    transpose_4: f32[2, 8, 4, 16] = attn_output.transpose(1, 2)
    attn_output_1: f32[2, 8, 4, 16] = transpose_4.contiguous()
    reshape_2: f32[2, 8, 64] = attn_output_1.reshape(2, 8, -1)
    attn_output_2: f32[2, 8, 64] = reshape_2.contiguous()
    attn_output_3: f32[2, 8, 64] = torch.nn.functional.linear(attn_output_2, model.layers.0.self_attn.o_proj.weight, None)
    linear_4: f32[2, 8, 256] = torch.nn.functional.linear(layer_norm, model.layers.0.mlp.gate_proj.weight, None)
    silu: f32[2, 8, 256] = torch.nn.functional.silu(linear_4)
    linear_5: f32[2, 8, 256] = torch.nn.functional.linear(layer_norm, model.layers.0.mlp.up_proj.weight, None)
    mul_12: f32[2, 8, 256] = silu * linear_5
    down_proj: f32[2, 8, 64] = torch.nn.functional.linear(mul_12, model.layers.0.mlp.down_proj.weight, None)
    add_8: f32[2, 8, 64] = inputs_embeds + attn_output_3
    hidden_states_12: f32[2, 8, 64] = add_8 + down_proj
    layer_norm_1: f32[2, 8, 64] = cohere_fx.layer_norm(hidden_states_12, model.norm.weight, 1e-05)
    getitem_12: f32[2, 8, 64] = layer_norm_1[:, 0:, :]
    logits: f32[2, 8, 128] = torch.nn.functional.linear(getitem_12, model.embed_tokens.weight, None)
    logits_1: f32[2, 8, 128] = logits * 0.25
    return (values, keys, logits_1)
""")

    def test_cohere2_four_layers(self):
        self.assertExpectedInline(_rewritten(Cohere2ForCausalLM(tiny_cohere2_config(layers=4)), 8), """\
pattern     matches
----------  -------
layer_norm        5
graph 0: 316 nodes -> 261 nodes
graph(args_0: i64[2, 8], model.embed_tokens.weight: f32[128, 64], model.rotary_emb.inv_freq: f32[8], model.layers.0.input_layernorm.weight: f32[64], model.layers.0.self_attn.q_proj.weight: f32[64, 64], model.layers.0.self_attn.k_proj.weight: f32[32, 64], model.layers.0.self_attn.v_proj.weight: f32[32, 64], model.layers.0.self_attn.o_proj.weight: f32[64, 64], model.layers.0.mlp.gate_proj.weight: f32[256, 64], model.layers.0.mlp.up_proj.weight: f32[256, 64], model.layers.0.mlp.down_proj.weight: f32[64, 256], model.layers.1.input_layernorm.weight: f32[64], model.layers.1.self_attn.q_proj.weight: f32[64, 64], model.layers.1.self_attn.k_proj.weight: f32[32, 64], model.layers.1.self_attn.v_proj.weight: f32[32, 64], model.layers.1.self_attn.o_proj.weight: f32[64, 64], model.layers.1.mlp.gate_proj.weight: f32[256, 64], model.layers.1.mlp.up_proj.weight: f32[256, 64], model.layers.1.mlp.down_proj.weight: f32[64, 256], model.layers.2.input_layernorm.weight: f32[64], model.layers.2.self_attn.q_proj.weight: f32[64, 64], model.layers.2.self_attn.k_proj.weight: f32[32, 64], model.layers.2.self_attn.v_proj.weight: f32[32, 64], model.layers.2.self_attn.o_proj.weight: f32[64, 64], model.layers.2.mlp.gate_proj.weight: f32[256, 64], model.layers.2.mlp.up_proj.weight: f32[256, 64], model.layers.2.mlp.down_proj.weight: f32[64, 256], model.layers.3.input_layernorm.weight: f32[64], model.layers.3.self_attn.q_proj.weight: f32[64, 64], model.layers.3.self_attn.k_proj.weight: f32[32, 64], model.layers.3.self_attn.v_proj.weight: f32[32, 64], model.layers.3.self_attn.o_proj.weight: f32[64, 64], model.layers.3.mlp.gate_proj.weight: f32[256, 64], model.layers.3.mlp.up_proj.weight: f32[256, 64], model.layers.3.mlp.down_proj.weight: f32[64, 256], model.norm.weight: f32[64]):
    inputs_embeds: f32[2, 8, 64] = torch.nn.functional.embedding(args_0, model.embed_tokens.weight, 0, None, 2.0, False, False)
    tensor: i64[] = torch.tensor(4, dtype=torch.int64)
    tensor_1: i64[] = torch.tensor(4, dtype=torch.int64)
    tensor_2: i64[] = torch.tensor(4, dtype=torch.int64)
    arange: i64[8] = torch.arange(8, device=device('cpu'))
    position_ids: i64[8] = arange + 0
    position_ids_1: i64[1, 8] = position_ids.unsqueeze(0)
    batch_arange: i64[2] = torch.arange(2, device=device('cpu'))
    head_arange: i64[1] = torch.arange(1, device=device('cpu'))
    arange_3: i64[8] = torch.arange(8, device=device('cpu'))
    q_arange: i64[8] = arange_3 + 0
    arange_4: i64[8] = torch.arange(8, device=device('cpu'))
    kv_arange: i64[8] = arange_4 + 0
    q_indices: i64[1, 1, 8, 1] = q_arange[None, None, :, None]
    kv_indices: i64[1, 1, 1, 8] = kv_arange[None, None, None, :]
    attention_mask: b8[1, 1, 8, 8] = kv_indices <= q_indices
    attention_mask_1: b8[2, 1, 8, 8] = attention_mask.expand(2, -1, 8, 8)
    batch_arange_1: i64[2] = torch.arange(2, device=device('cpu'))
    head_arange_1: i64[1] = torch.arange(1, device=device('cpu'))
    arange_7: i64[8] = torch.arange(8, device=device('cpu'))
    q_arange_1: i64[8] = arange_7 + 0
    arange_8: i64[8] = torch.arange(8, device=device('cpu'))
    kv_arange_1: i64[8] = arange_8 + 0
    q_indices_1: i64[1, 1, 8, 1] = q_arange_1[None, None, :, None]
    kv_indices_1: i64[1, 1, 1, 8] = kv_arange_1[None, None, None, :]
    result: b8[] = q_indices_1.new_ones((), dtype=torch.bool)
    sub: i64[1, 1, 8, 1] = q_indices_1 - 4
    gt: b8[1, 1, 8, 8] = kv_indices_1 > sub
    to: b8[1, 1, 8, 8] = gt.to(device('cpu'))
    result_1: b8[1, 1, 8, 8] = result & to
    le_1: b8[1, 1, 8, 8] = kv_indices_1 <= q_indices_1
    to_1: b8[1, 1, 8, 8] = le_1.to(device('cpu'))
    result_2: b8[1, 1, 8, 8] = result_1 & to_1
    attention_mask_2: b8[2, 1, 8, 8] = result_2.expand(2, -1, 8, 8)
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
    layer_norm: f32[2, 8, 64] = cohere_fx.layer_norm(inputs_embeds, model.layers.0.input_layernorm.weight, 1e-05)
    linear: f32[2, 8, 64] = torch.nn.functional.linear(layer_norm, model.layers.0.self_attn.q_proj.weight, None)
    view: f32[2, 8, 4, 16] = linear.view((2, 8, -1, 16))
    query_states: f32[2, 4, 8, 16] = view.transpose(1, 2)
    linear_1: f32[2, 8, 32] = torch.nn.functional.linear(layer_norm, model.layers.0.self_attn.k_proj.weight, None)
    view_1: f32[2, 8, 2, 16] = linear_1.view((2, 8, -1, 16))
    key_states: f32[2, 2, 8, 16] = view_1.transpose(1, 2)
    linear_2: f32[2, 8, 32] = torch.nn.functional.linear(layer_norm, model.layers.0.self_attn.v_proj.weight, None)
    view_2: f32[2, 8, 2, 16] = linear_2.view((2, 8, -1, 16))
    value_states: f32[2, 2, 8, 16] = view_2.transpose(1, 2)
    q: f32[2, 4, 8, 16] = query_states.to(torch.float32)
    k: f32[2, 2, 8, 16] = key_states.to(torch.float32)
    cos_3: f32[1, 1, 8, 16] = cos_2.unsqueeze(1)
    sin_3: f32[1, 1, 8, 16] = sin_2.unsqueeze(1)
    mul_4: f32[2, 4, 8, 16] = q * cos_3
    x1: f32[2, 4, 8, 8] = q[..., ::2]
    x2: f32[2, 4, 8, 8] = q[..., 1::2]
    neg: f32[2, 4, 8, 8] = -x2
    stack: f32[2, 4, 8, 8, 2] = torch.stack([neg, x1], dim=-1)
    rot_x: f32[2, 4, 8, 16] = stack.flatten(-2)
    mul_5: f32[2, 4, 8, 16] = rot_x * sin_3
    q_embed: f32[2, 4, 8, 16] = mul_4 + mul_5
    mul_6: f32[2, 2, 8, 16] = k * cos_3
    x1_1: f32[2, 2, 8, 8] = k[..., ::2]
    x2_1: f32[2, 2, 8, 8] = k[..., 1::2]
    neg_1: f32[2, 2, 8, 8] = -x2_1
    stack_1: f32[2, 2, 8, 8, 2] = torch.stack([neg_1, x1_1], dim=-1)
    rot_x_1: f32[2, 2, 8, 16] = stack_1.flatten(-2)
    mul_7: f32[2, 2, 8, 16] = rot_x_1 * sin_3
    k_embed: f32[2, 2, 8, 16] = mul_6 + mul_7
    query_states_1: f32[2, 4, 8, 16] = q_embed.to(torch.float32)
    key_states_1: f32[2, 2, 8, 16] = k_embed.to(torch.float32)
    tensor_3: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    tensor_4: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    to_9: i64[] = tensor.to(device('cpu'))
    full_key_states: f32[2, 2, 8, 16] = torch.cat([tensor_3, key_states_1], dim=-2)
    full_value_states: f32[2, 2, 8, 16] = torch.cat([tensor_4, value_states], dim=-2)
    getitem_14: f32[2, 2, 3, 16] = full_key_states[:, :, -3:, :]
    getitem_15: f32[2, 2, 3, 16] = full_value_states[:, :, -3:, :]
    getitem_16: f32[2, 2, 1, 8, 16] = full_key_states[:, :, None, :, :]
    hidden_states_4: f32[2, 2, 2, 8, 16] = getitem_16.expand(2, 2, 2, 8, 16)
    key: f32[2, 4, 8, 16] = hidden_states_4.reshape(2, 4, 8, 16)
    getitem_17: f32[2, 2, 1, 8, 16] = full_value_states[:, :, None, :, :]
    hidden_states_5: f32[2, 2, 2, 8, 16] = getitem_17.expand(2, 2, 2, 8, 16)
    value: f32[2, 4, 8, 16] = hidden_states_5.reshape(2, 4, 8, 16)
    attn_output: f32[2, 4, 8, 16] = torch.nn.functional.scaled_dot_product_attention(query_states_1, key, value, attn_mask=attention_mask_2, dropout_p=0.0, scale=0.25, is_causal=False)
    transpose_4: f32[2, 8, 4, 16] = attn_output.transpose(1, 2)
    attn_output_1: f32[2, 8, 4, 16] = transpose_4.contiguous()
    reshape_2: f32[2, 8, 64] = attn_output_1.reshape(2, 8, -1)
    attn_output_2: f32[2, 8, 64] = reshape_2.contiguous()
    attn_output_3: f32[2, 8, 64] = torch.nn.functional.linear(attn_output_2, model.layers.0.self_attn.o_proj.weight, None)
    linear_4: f32[2, 8, 256] = torch.nn.functional.linear(layer_norm, model.layers.0.mlp.gate_proj.weight, None)
    silu: f32[2, 8, 256] = torch.nn.functional.silu(linear_4)
    linear_5: f32[2, 8, 256] = torch.nn.functional.linear(layer_norm, model.layers.0.mlp.up_proj.weight, None)
    mul_8: f32[2, 8, 256] = silu * linear_5
    down_proj: f32[2, 8, 64] = torch.nn.functional.linear(mul_8, model.layers.0.mlp.down_proj.weight, None)
    add_8: f32[2, 8, 64] = inputs_embeds + attn_output_3
    hidden_states_6: f32[2, 8, 64] = add_8 + down_proj
    layer_norm_1: f32[2, 8, 64] = cohere_fx.layer_norm(hidden_states_6, model.layers.1.input_layernorm.weight, 1e-05)
    linear_7: f32[2, 8, 64] = torch.nn.functional.linear(layer_norm_1, model.layers.1.self_attn.q_proj.weight, None)
    view_3: f32[2, 8, 4, 16] = linear_7.view((2, 8, -1, 16))
    query_states_2: f32[2, 4, 8, 16] = view_3.transpose(1, 2)
    linear_8: f32[2, 8, 32] = torch.nn.functional.linear(layer_norm_1, model.layers.1.self_attn.k_proj.weight, None)
    view_4: f32[2, 8, 2, 16] = linear_8.view((2, 8, -1, 16))
    key_states_2: f32[2, 2, 8, 16] = view_4.transpose(1, 2)
    linear_9: f32[2, 8, 32] = torch.nn.functional.linear(layer_norm_1, model.layers.1.self_attn.v_proj.weight, None)
    view_5: f32[2, 8, 2, 16] = linear_9.view((2, 8, -1, 16))
    value_states_1: f32[2, 2, 8, 16] = view_5.transpose(1, 2)
    q_1: f32[2, 4, 8, 16] = query_states_2.to(torch.float32)
    k_1: f32[2, 2, 8, 16] = key_states_2.to(torch.float32)
    cos_4: f32[1, 1, 8, 16] = cos_2.unsqueeze(1)
    sin_4: f32[1, 1, 8, 16] = sin_2.unsqueeze(1)
    mul_11: f32[2, 4, 8, 16] = q_1 * cos_4
    x1_2: f32[2, 4, 8, 8] = q_1[..., ::2]
    x2_2: f32[2, 4, 8, 8] = q_1[..., 1::2]
    neg_2: f32[2, 4, 8, 8] = -x2_2
    stack_2: f32[2, 4, 8, 8, 2] = torch.stack([neg_2, x1_2], dim=-1)
    rot_x_2: f32[2, 4, 8, 16] = stack_2.flatten(-2)
    mul_12: f32[2, 4, 8, 16] = rot_x_2 * sin_4
    q_embed_1: f32[2, 4, 8, 16] = mul_11 + mul_12
    mul_13: f32[2, 2, 8, 16] = k_1 * cos_4
    x1_3: f32[2, 2, 8, 8] = k_1[..., ::2]
    x2_3: f32[2, 2, 8, 8] = k_1[..., 1::2]
    neg_3: f32[2, 2, 8, 8] = -x2_3
    stack_3: f32[2, 2, 8, 8, 2] = torch.stack([neg_3, x1_3], dim=-1)
    rot_x_3: f32[2, 2, 8, 16] = stack_3.flatten(-2)
    mul_14: f32[2, 2, 8, 16] = rot_x_3 * sin_4
    k_embed_1: f32[2, 2, 8, 16] = mul_13 + mul_14
    query_states_3: f32[2, 4, 8, 16] = q_embed_1.to(torch.float32)
    key_states_3: f32[2, 2, 8, 16] = k_embed_1.to(torch.float32)
    tensor_5: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    tensor_6: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    to_15: i64[] = tensor_1.to(device('cpu'))
    full_key_states_1: f32[2, 2, 8, 16] = torch.cat([tensor_5, key_states_3], dim=-2)
    full_value_states_1: f32[2, 2, 8, 16] = torch.cat([tensor_6, value_states_1], dim=-2)
    getitem_22: f32[2, 2, 3, 16] = full_key_states_1[:, :, -3:, :]
    getitem_23: f32[2, 2, 3, 16] = full_value_states_1[:, :, -3:, :]
    getitem_24: f32[2, 2, 1, 8, 16] = full_key_states_1[:, :, None, :, :]
    hidden_states_11: f32[2, 2, 2, 8, 16] = getitem_24.expand(2, 2, 2, 8, 16)
    key_1: f32[2, 4, 8, 16] = hidden_states_11.reshape(2, 4, 8, 16)
    getitem_25: f32[2, 2, 1, 8, 16] = full_value_states_1[:, :, None, :, :]
    hidden_states_12: f32[2, 2, 2, 8, 16] = getitem_25.expand(2, 2, 2, 8, 16)
    value_1: f32[2, 4, 8, 16] = hidden_states_12.reshape(2, 4, 8, 16)
    attn_output_4: f32[2, 4, 8, 16] = torch.nn.functional.scaled_dot_product_attention(query_states_3, key_1, value_1, attn_mask=attention_mask_2, dropout_p=0.0, scale=0.25, is_causal=False)
    transpose_8: f32[2, 8, 4, 16] = attn_output_4.transpose(1, 2)
    attn_output_5: f32[2, 8, 4, 16] = transpose_8.contiguous()
    reshape_5: f32[2, 8, 64] = attn_output_5.reshape(2, 8, -1)
    attn_output_6: f32[2, 8, 64] = reshape_5.contiguous()
    attn_output_7: f32[2, 8, 64] = torch.nn.functional.linear(attn_output_6, model.layers.1.self_attn.o_proj.weight, None)
    linear_11: f32[2, 8, 256] = torch.nn.functional.linear(layer_norm_1, model.layers.1.mlp.gate_proj.weight, None)
    silu_1: f32[2, 8, 256] = torch.nn.functional.silu(linear_11)
    linear_12: f32[2, 8, 256] = torch.nn.functional.linear(layer_norm_1, model.layers.1.mlp.up_proj.weight, None)
    mul_15: f32[2, 8, 256] = silu_1 * linear_12
    down_proj_1: f32[2, 8, 64] = torch.nn.functional.linear(mul_15, model.layers.1.mlp.down_proj.weight, None)
    add_13: f32[2, 8, 64] = hidden_states_6 + attn_output_7
    hidden_states_13: f32[2, 8, 64] = add_13 + down_proj_1
    layer_norm_2: f32[2, 8, 64] = cohere_fx.layer_norm(hidden_states_13, model.layers.2.input_layernorm.weight, 1e-05)
    linear_14: f32[2, 8, 64] = torch.nn.functional.linear(layer_norm_2, model.layers.2.self_attn.q_proj.weight, None)
    view_6: f32[2, 8, 4, 16] = linear_14.view((2, 8, -1, 16))
    query_states_4: f32[2, 4, 8, 16] = view_6.transpose(1, 2)
    linear_15: f32[2, 8, 32] = torch.nn.functional.linear(layer_norm_2, model.layers.2.self_attn.k_proj.weight, None)
    view_7: f32[2, 8, 2, 16] = linear_15.view((2, 8, -1, 16))
    key_states_4: f32[2, 2, 8, 16] = view_7.transpose(1, 2)
    linear_16: f32[2, 8, 32] = torch.nn.functional.linear(layer_norm_2, model.layers.2.self_attn.v_proj.weight, None)
    view_8: f32[2, 8, 2, 16] = linear_16.view((2, 8, -1, 16))
    value_states_2: f32[2, 2, 8, 16] = view_8.transpose(1, 2)
    q_2: f32[2, 4, 8, 16] = query_states_4.to(torch.float32)
    k_2: f32[2, 2, 8, 16] = key_states_4.to(torch.float32)
    cos_5: f32[1, 1, 8, 16] = cos_2.unsqueeze(1)
    sin_5: f32[1, 1, 8, 16] = sin_2.unsqueeze(1)
    mul_18: f32[2, 4, 8, 16] = q_2 * cos_5
    x1_4: f32[2, 4, 8, 8] = q_2[..., ::2]
    x2_4: f32[2, 4, 8, 8] = q_2[..., 1::2]
    neg_4: f32[2, 4, 8, 8] = -x2_4
    stack_4: f32[2, 4, 8, 8, 2] = torch.stack([neg_4, x1_4], dim=-1)
    rot_x_4: f32[2, 4, 8, 16] = stack_4.flatten(-2)
    mul_19: f32[2, 4, 8, 16] = rot_x_4 * sin_5
    q_embed_2: f32[2, 4, 8, 16] = mul_18 + mul_19
    mul_20: f32[2, 2, 8, 16] = k_2 * cos_5
    x1_5: f32[2, 2, 8, 8] = k_2[..., ::2]
    x2_5: f32[2, 2, 8, 8] = k_2[..., 1::2]
    neg_5: f32[2, 2, 8, 8] = -x2_5
    stack_5: f32[2, 2, 8, 8, 2] = torch.stack([neg_5, x1_5], dim=-1)
    rot_x_5: f32[2, 2, 8, 16] = stack_5.flatten(-2)
    mul_21: f32[2, 2, 8, 16] = rot_x_5 * sin_5
    k_embed_2: f32[2, 2, 8, 16] = mul_20 + mul_21
    query_states_5: f32[2, 4, 8, 16] = q_embed_2.to(torch.float32)
    key_states_5: f32[2, 2, 8, 16] = k_embed_2.to(torch.float32)
    tensor_7: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    tensor_8: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    to_21: i64[] = tensor_2.to(device('cpu'))
    full_key_states_2: f32[2, 2, 8, 16] = torch.cat([tensor_7, key_states_5], dim=-2)
    full_value_states_2: f32[2, 2, 8, 16] = torch.cat([tensor_8, value_states_2], dim=-2)
    getitem_30: f32[2, 2, 3, 16] = full_key_states_2[:, :, -3:, :]
    getitem_31: f32[2, 2, 3, 16] = full_value_states_2[:, :, -3:, :]
    getitem_32: f32[2, 2, 1, 8, 16] = full_key_states_2[:, :, None, :, :]
    hidden_states_18: f32[2, 2, 2, 8, 16] = getitem_32.expand(2, 2, 2, 8, 16)
    key_2: f32[2, 4, 8, 16] = hidden_states_18.reshape(2, 4, 8, 16)
    getitem_33: f32[2, 2, 1, 8, 16] = full_value_states_2[:, :, None, :, :]
    hidden_states_19: f32[2, 2, 2, 8, 16] = getitem_33.expand(2, 2, 2, 8, 16)
    value_2: f32[2, 4, 8, 16] = hidden_states_19.reshape(2, 4, 8, 16)
    attn_output_8: f32[2, 4, 8, 16] = torch.nn.functional.scaled_dot_product_attention(query_states_5, key_2, value_2, attn_mask=attention_mask_2, dropout_p=0.0, scale=0.25, is_causal=False)
    transpose_12: f32[2, 8, 4, 16] = attn_output_8.transpose(1, 2)
    attn_output_9: f32[2, 8, 4, 16] = transpose_12.contiguous()
    reshape_8: f32[2, 8, 64] = attn_output_9.reshape(2, 8, -1)
    attn_output_10: f32[2, 8, 64] = reshape_8.contiguous()
    attn_output_11: f32[2, 8, 64] = torch.nn.functional.linear(attn_output_10, model.layers.2.self_attn.o_proj.weight, None)
    linear_18: f32[2, 8, 256] = torch.nn.functional.linear(layer_norm_2, model.layers.2.mlp.gate_proj.weight, None)
    silu_2: f32[2, 8, 256] = torch.nn.functional.silu(linear_18)
    linear_19: f32[2, 8, 256] = torch.nn.functional.linear(layer_norm_2, model.layers.2.mlp.up_proj.weight, None)
    mul_22: f32[2, 8, 256] = silu_2 * linear_19
    down_proj_2: f32[2, 8, 64] = torch.nn.functional.linear(mul_22, model.layers.2.mlp.down_proj.weight, None)
    add_18: f32[2, 8, 64] = hidden_states_13 + attn_output_11
    hidden_states_20: f32[2, 8, 64] = add_18 + down_proj_2
    layer_norm_3: f32[2, 8, 64] = cohere_fx.layer_norm(hidden_states_20, model.layers.3.input_layernorm.weight, 1e-05)
    linear_21: f32[2, 8, 64] = torch.nn.functional.linear(layer_norm_3, model.layers.3.self_attn.q_proj.weight, None)
    view_9: f32[2, 8, 4, 16] = linear_21.view((2, 8, -1, 16))
    query_states_6: f32[2, 4, 8, 16] = view_9.transpose(1, 2)
    linear_22: f32[2, 8, 32] = torch.nn.functional.linear(layer_norm_3, model.layers.3.self_attn.k_proj.weight, None)
    view_10: f32[2, 8, 2, 16] = linear_22.view((2, 8, -1, 16))
    key_states_6: f32[2, 2, 8, 16] = view_10.transpose(1, 2)
    linear_23: f32[2, 8, 32] = torch.nn.functional.linear(layer_norm_3, model.layers.3.self_attn.v_proj.weight, None)
    view_11: f32[2, 8, 2, 16] = linear_23.view((2, 8, -1, 16))
    value_states_3: f32[2, 2, 8, 16] = view_11.transpose(1, 2)
    tensor_9: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    tensor_10: f32[0] = torch.tensor([], dtype=torch.float32, device=device('cpu'))
    keys: f32[2, 2, 8, 16] = torch.cat([tensor_9, key_states_6], dim=-2)
    values: f32[2, 2, 8, 16] = torch.cat([tensor_10, value_states_3], dim=-2)
    getitem_34: f32[2, 2, 1, 8, 16] = keys[:, :, None, :, :]
    hidden_states_25: f32[2, 2, 2, 8, 16] = getitem_34.expand(2, 2, 2, 8, 16)
    key_3: f32[2, 4, 8, 16] = hidden_states_25.reshape(2, 4, 8, 16)
    getitem_35: f32[2, 2, 1, 8, 16] = values[:, :, None, :, :]
    hidden_states_26: f32[2, 2, 2, 8, 16] = getitem_35.expand(2, 2, 2, 8, 16)
    value_3: f32[2, 4, 8, 16] = hidden_states_26.reshape(2, 4, 8, 16)
    attn_output_12: f32[2, 4, 8, 16] = torch.nn.functional.scaled_dot_product_attention(query_states_6, key_3, value_3, attn_mask=attention_mask_1, dropout_p=0.0, scale=0.25, is_causal=False)
    transpose_16: f32[2, 8, 4, 16] = attn_output_12.transpose(1, 2)
    attn_output_13: f32[2, 8, 4, 16] = transpose_16.contiguous()
    reshape_11: f32[2, 8, 64] = attn_output_13.reshape(2, 8, -1)
    attn_output_14: f32[2, 8, 64] = reshape_11.contiguous()
    attn_output_15: f32[2, 8, 64] = torch.nn.functional.linear(attn_output_14, model.layers.3.self_attn.o_proj.weight, None)
    linear_25: f32[2, 8, 256] = torch.nn.functional.linear(layer_norm_3, model.layers.3.mlp.gate_proj.weight, None)
    silu_3: f32[2, 8, 256] = torch.nn.functional.silu(linear_25)
    linear_26: f32[2, 8, 256] = torch.nn.functional.linear(layer_norm_3, model.layers.3.mlp.up_proj.weight, None)
    mul_25: f32[2, 8, 256] = silu_3 * linear_26
    down_proj_3: f32[2, 8, 64] = torch.nn.functional.linear(mul_25, model.layers.3.mlp.down_proj.weight, None)
    add_21: f32[2, 8, 64] = hidden_states_20 + attn_output_15
    hidden_states_27: f32[2, 8, 64] = add_21 + down_proj_3
    layer_norm_4: f32[2, 8, 64] = cohere_fx.layer_norm(hidden_states_27, model.norm.weight, 1e-05)
    getitem_36: f32[2, 8, 64] = layer_norm_4[:, 0:, :]
    logits: f32[2, 8, 128] = torch.nn.functional.linear(getitem_36, model.embed_tokens.weight, None)
    logits_1: f32[2, 8, 128] = logits * 0.25
    return (to_9, getitem_15, getitem_14, to_15, getitem_23, getitem_22, to_21, getitem_31, getitem_30, values, keys, logits_1)
""")
