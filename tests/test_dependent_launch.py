"""Programmatic dependent launch (kernels/dependent_launch.py): decode steps give the same logits, bit for bit, with
it and without it, and every kernel launched with it waits for the kernel before it before touching memory."""
import re

import pytest
import torch
from transformers import Cohere2ForCausalLM

from cohere_fx.configs import tiny_cohere2_config
from cohere_fx.kernels.decode_linear import _decode_linear_kernel
from cohere_fx.kernels.decode_residual import _decode_residual_kernel
from cohere_fx.kernels.dependent_launch import dependent_launch
from cohere_fx.kernels.layer_norm import _layer_norm_fwd_kernel
from cohere_fx.kernels.rope_kv_write import _rope_kv_write_kernel
from cohere_fx.kernels.swiglu import _swiglu_fwd_kernel
from cohere_fx.runtime import DecodeRunner

DECODE_KERNELS = [_layer_norm_fwd_kernel, _decode_linear_kernel, _rope_kv_write_kernel, _swiglu_fwd_kernel,
                  _decode_residual_kernel]


def test_off_where_triton_runs_no_ptx():
    """The interpreter runs no inline PTX: on the CPU the kernels are launched without PDL."""
    assert dependent_launch(torch.empty(1)) == {"PDL": False}


@pytest.mark.gpu
def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv("COHERE_FX_PDL", raising=False)
    assert dependent_launch(torch.empty(1, device="cuda")) == {"PDL": False}


def _greedy_logits(model, steps: int) -> list[torch.Tensor]:
    """Each step's logits of three sequences decoded greedily in CUDA graphs (Cohere2: sliding and global layers)."""
    runner = DecodeRunner(model, max_batch=4, max_seq_len=512, block_size=16)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=gen).cuda() for n in (40, 9, 23)]
    logits = runner.prefill_batch([0, 1, 2], prompts)
    out = [logits]
    for _ in range(steps):
        logits = runner.decode([0, 1, 2], logits.argmax(-1))
        out.append(logits.clone())
    return out


@pytest.mark.gpu
def test_decode_equals_decode_without_dependent_launch(monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    torch.manual_seed(0)
    config = tiny_cohere2_config(heads=4, kv_heads=2, head_dim=64, sliding_window=24, initializer_range=0.2)
    model = Cohere2ForCausalLM(config).cuda().to(torch.bfloat16).eval()
    monkeypatch.setenv("COHERE_FX_PDL", "0")
    without = _greedy_logits(model, 30)
    monkeypatch.setenv("COHERE_FX_PDL", "1")
    torch._dynamo.reset()
    with_pdl = _greedy_logits(model, 30)
    for step, (a, b) in enumerate(zip(with_pdl, without)):
        assert torch.equal(a, b), f"step {step}"

    # Each decode kernel ran with PDL, and its PTX waits (griddepcontrol.wait) before its first global memory access.
    for kernel in DECODE_KERNELS:
        compiled = [c for cache, *_ in kernel.device_caches.values() for c in cache.values() if c.metadata.launch_pdl]
        assert compiled, f"{kernel.fn.__name__} was not launched with PDL"
        for c in compiled:
            ptx = c.asm["ptx"]
            body = ptx[ptx.index(".entry"):]
            wait = body.index("griddepcontrol.wait")
            access = re.search(r"\b(ld|st|cp\.async|atom|red)(\.[a-z0-9]+)*\.global", body)
            assert access and wait < access.start(), f"{kernel.fn.__name__}: memory access before the wait"
