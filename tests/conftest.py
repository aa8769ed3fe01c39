"""Test-wide setup: Triton's interpreter on where there is no GPU (CI), seeds, the `gpu` marker."""
import os

import numpy as np

import torch

# Set before triton is imported anywhere: its jit decorator reads it. On a GPU machine kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cohere_fx.kernels import interpreter_enabled  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Each test compiles from scratch: no cached frames, no recompile limit reached by earlier tests."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _round_like_gpu(monkeypatch):
    """Triton 3.6's interpreter casts fp32 -> bf16 by truncation, compiled kernels round to nearest even: round
    as the GPU does, so CPU checks see the GPU's roundings (bitwise kernel tests, bf16 model parity)."""
    if not interpreter_enabled():
        return
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_rne(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16
        return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_rne)
