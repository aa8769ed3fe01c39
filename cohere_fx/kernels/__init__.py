"""Triton kernels, one file per kernel family, forward and backward side by side.

Every launcher takes ordinary torch tensors and works wherever Triton can run them: CUDA tensors on a GPU, or
CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported (that is how CI runs the real
kernel code without a GPU).
"""
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on_triton(t: torch.Tensor) -> bool:
    """Whether an op should launch its Triton kernel for tensors on ``t``'s device (else: torch reference)."""
    return t.is_cuda or (t.device.type == "cpu" and interpreter_enabled())
