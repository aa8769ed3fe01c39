"""tied_embedding_grad: the op adds a lookup's gradient rows into a dense gradient exactly as the dense add does, and
the post-grad pass makes inductor's backward call it instead of building the [V, H] lookup gradient (CPU inductor,
a tiny Cohere with its tied head), with eager's gradients; untied models and explicit pass lists leave it out, and a
post-grad pass of the user's own still runs, after it."""
import pytest
import torch
from torch._inductor.utils import run_and_get_code
from transformers import CohereForCausalLM

import cohere_fx.ops  # noqa: F401
from cohere_fx.configs import tiny_cohere_config
from parity import rel_err

op = torch.ops.cohere_fx.embedding_backward_add_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [0, -1])
def test_op_equals_the_dense_add(dtype, padding_idx):
    """Repeated tokens (summed in fp32, rounded once, as ATen's dense backward does) and the padding token: bitwise
    the head gradient plus the dense lookup gradient."""
    torch.manual_seed(0)
    vocab, hidden = 50, 8
    ids = torch.randint(0, vocab, (3, 20))
    ids[0, :3], ids[1, 5:9] = 0, 7
    grad, head = torch.randn(3, 20, hidden).to(dtype), torch.randn(vocab, hidden).to(dtype)
    dense = head + torch.ops.aten.embedding_dense_backward(grad, ids, vocab, padding_idx, False)
    out = head.clone()
    op(out, grad, ids, padding_idx)
    assert torch.equal(out, dense)
    torch.library.opcheck(op, (head.clone(), grad, ids, padding_idx))


def training_step_code(tied=True, options=None):
    """(embed_tokens gradient, eager's, the generated code) of one inductor-compiled training step."""
    torch.manual_seed(0)
    model = CohereForCausalLM(tiny_cohere_config(layers=1, tie_word_embeddings=tied)).train()
    ids = torch.randint(3, 128, (2, 8))
    ids[0, :2] = 0  # padding tokens: no gradient for their row

    def grad(run):
        model.zero_grad(set_to_none=True)
        run(input_ids=ids, labels=ids).loss.backward()
        return model.model.embed_tokens.weight.grad.clone()

    eager = grad(model)
    compiled, codes = run_and_get_code(lambda: grad(torch.compile(model, backend="cohere_fx", options=options)))
    return compiled, eager, "\n".join(codes)


@pytest.mark.slow
@pytest.mark.parametrize("return_logits", [True, False])
def test_backward_adds_the_rows_into_the_head_gradient(return_logits):
    compiled, eager, code = training_step_code(options={"return_logits": return_logits})
    assert code.count("torch.ops.cohere_fx.embedding_backward_add_.default(") == 1
    assert "torch.ops.cohere_fx.embedding_backward.default(" not in code
    assert rel_err(compiled, eager) < 1e-6


@pytest.mark.slow
def test_left_out_for_untied_heads_and_explicit_pass_lists_and_ahead_of_a_users_pass():
    for tied, options in ((False, None), (True, {"passes": ["embedding", "layer_norm"]})):
        compiled, eager, code = training_step_code(tied, options)
        assert "embedding_backward_add_" not in code and rel_err(compiled, eager) < 1e-6
    seen = []  # a post-grad pass of the user's own runs after this one, on the rewritten graph
    training_step_code(options={"inductor_config": {"post_grad_custom_post_pass": seen.append}})
    assert any(g.find_nodes(op="call_function", target=op.default) for g in seen)
