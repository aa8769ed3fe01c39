"""Triton kernels, one file per kernel family, forward and backward side by side.

Every launcher takes ordinary torch tensors and works wherever Triton can run them: CUDA tensors on a GPU, or
CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported (that is how CI runs the real
kernel code without a GPU).
"""
import contextlib
import functools
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on_triton(t: torch.Tensor) -> bool:
    """Whether an op should launch its Triton kernel for tensors on ``t``'s device (else: torch reference)."""
    return t.is_cuda or (t.device.type == "cpu" and interpreter_enabled())


def on_device(t: torch.Tensor):
    """Launch context: Triton launches on the current CUDA device, which must be the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    """Launchers' grid arithmetic in plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr
    functions whose calls cost microseconds each on the host, and a training step makes thousands of launches."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_programs(t: torch.Tensor, per_sm: int = 4) -> int:
    """Grid size for kernels whose programs each walk many rows and write one partial sum (weight grads): a
    few programs per SM on CUDA, a handful under the interpreter."""
    if t.is_cuda:
        return per_sm * sm_count(t.device)
    return 4
