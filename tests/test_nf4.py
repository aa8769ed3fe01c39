"""nf4_dequantize: the kernel (under TRITON_INTERPRET=1 on CPU) and the torch reference bit for bit against
bitsandbytes' own dequantisation; opcheck; the pattern on a QLoRA model (every dequantisation of a traced training
step replaced, the same loss and LoRA gradients as eager) and where it must leave the graph alone."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import CohereForCausalLM

import cohere_fx
import cohere_fx.ops  # noqa: F401
from cohere_fx.configs import tiny_cohere_config
from cohere_fx.kernels.nf4 import NF4, nf4_dequantize
from cohere_fx.ops.nf4 import nf4_dequantize_reference

bnb = pytest.importorskip("bitsandbytes")
functional = pytest.importorskip("bitsandbytes.functional")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantized(shape, dtype, blocksize, device="cpu"):
    """A weight quantised as QLoRA does (nf4, double quantisation), the op's inputs, and bitsandbytes' weight."""
    torch.manual_seed(sum(shape) + blocksize)
    w = (torch.randn(shape, device=device) * 0.05).to(dtype)
    q, state = functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    args = (q, state.absmax, state.state2.code, state.state2.absmax, state.offset, blocksize, list(state.shape),
            dtype)
    return args, functional.dequantize_4bit(q, state)


def test_table_is_bitsandbytes_nf4():
    assert torch.equal(torch.tensor(NF4), functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape, blocksize", [((256, 192), 64), ((7, 9), 64), ((64, 1030), 128), ((300, 64), 32)])
def test_kernel_and_reference_equal_bitsandbytes(dtype, shape, blocksize):
    """Bit for bit, at sizes that leave a half-filled byte, a part block and a part second-level block."""
    args, want = quantized(shape, dtype, blocksize)
    assert torch.equal(nf4_dequantize_reference(*args), want)
    assert torch.equal(nf4_dequantize(*args), want)


def test_opcheck_and_refusals():
    args, _ = quantized((40, 64), torch.bfloat16, 64)
    torch.library.opcheck(torch.ops.cohere_fx.nf4_dequantize.default, args)
    q, absmax_q, code8, absmax_scale, offset, blocksize, shape, dtype = args
    with pytest.raises(ValueError, match="block scales"):
        torch.ops.cohere_fx.nf4_dequantize(q, absmax_q[:-1], code8, absmax_scale, offset, blocksize, shape, dtype)
    with pytest.raises(ValueError, match="power of two"):
        torch.ops.cohere_fx.nf4_dequantize(q, absmax_q, code8, absmax_scale, offset, 48, shape, dtype)


def qlora_model(tmp_path, quant_type="nf4"):
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    CohereForCausalLM(tiny_cohere_config(layers=1)).to(torch.bfloat16).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = CohereForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.bfloat16,
                                              device_map="cpu")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, lora).train()


def bnb_op(name):
    return getattr(torch.ops.bitsandbytes, name).default


def bnb_dequantizations(model, ids) -> int:
    """The dequantisations in the traced training step (every subgraph): gemm_4bit calls and dequantize_4bit."""
    found = []

    def count(gm, example_inputs):
        found.extend(n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
                     if n.op == "call_function" and n.target in (bnb_op("gemm_4bit"), bnb_op("dequantize_4bit")))
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=count)(input_ids=ids, labels=ids)
    torch._dynamo.reset()
    return len(found)


def lora_step(model, ids, passes=None):
    """Loss and LoRA gradients: eager when ``passes`` is None, else compiled (no inductor) with only those
    patterns."""
    options = {"inductor": False, "passes": passes}
    run = model if passes is None else torch.compile(model, backend="cohere_fx", options=options)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    loss = run(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_step_uses_the_op_with_eager_gradients(tmp_path):
    """2 x 1024 tokens: more rows than bitsandbytes' own 4-bit GEMM takes, so the forward's gemm_4bit is rewritten
    too. Every dequantisation is replaced, and the step with this pattern alone computes the loss and LoRA gradients
    of the same compile without it bit for bit (the op's weights are bitsandbytes', the linear is the one it calls).
    Against eager the loss is equal too; the gradients differ within accumulation order without any pattern."""
    model = qlora_model(tmp_path)
    ids = torch.randint(3, 128, (2, 1024))
    sites = bnb_dequantizations(model, ids)
    report = cohere_fx.explain(model, ids, labels=ids, options={"passes": ["nf4_dequantize"]})
    assert sites > 0 and report.matches["nf4_dequantize"] == sites, (sites, report.near_misses["nf4_dequantize"])
    (loss, grads), (loss_ref, grads_ref) = lora_step(model, ids, ["nf4_dequantize"]), lora_step(model, ids, [])
    assert torch.equal(loss, loss_ref) and torch.equal(loss, lora_step(model, ids)[0])
    assert grads.keys() == grads_ref.keys() and all(torch.equal(grads[n], grads_ref[n]) for n in grads)


def test_left_alone_for_few_rows_and_fp4(tmp_path):
    """A few rows: bitsandbytes' gemm_4bit may run its own 4-bit GEMM there (a near miss says so; the backward's
    dequantisations are still taken). fp4 weights: nothing matches."""
    ids = torch.randint(3, 128, (2, 8))
    report = cohere_fx.explain(qlora_model(tmp_path), ids, labels=ids)
    assert any("rows: bitsandbytes may use its own 4-bit GEMM" in m for m in report.near_misses["nf4_dequantize"])
    fp4 = cohere_fx.explain(qlora_model(tmp_path / "fp4", "fp4"), ids, labels=ids)
    assert fp4.matches["nf4_dequantize"] == 0
    assert all("not nf4" in m or "rows" in m for m in fp4.near_misses["nf4_dequantize"])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(14336, 4096), (1024, 4096)], ids=["gate", "k"])
def test_cuda_kernel_equals_bitsandbytes(shape):
    """r7b's gate_proj and k_proj weights, against bitsandbytes' CUDA kernels, bit for bit."""
    args, want = quantized(shape, torch.bfloat16, 64, device="cuda")
    assert torch.equal(nf4_dequantize(*args), want)
