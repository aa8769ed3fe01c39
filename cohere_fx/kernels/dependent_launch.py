"""Programmatic dependent launch (PDL, sm_90+): a decode step's kernels start while the kernel before them ends.

Why: a Command-R7B decode step is ~260 dependent launches, most of them weight streams of 50-100 us. Between two of
them the device drains the first kernel's last programs, then launches and ramps up the next: the SMs idle for a
few microseconds per boundary, ~0.5 ms of a ~6.8 ms step at 16 sequences (the step's kernels sum to less than the
step). Launched with PDL, the next kernel's programs are scheduled onto the SMs the last programs of the kernel
before it leave free, and wait there (``griddepcontrol.wait``) until it has finished and its writes are visible.

Safety rests on two rules that every kernel launched with ``dependent_launch`` keeps:
- it calls ``wait_for_inputs(PDL)`` before its first load or store of global memory, so it reads nothing the kernel
  before it still writes and writes nothing that kernel still reads;
- that call also signals its own dependents (``griddepcontrol.launch_dependents``) only after the wait: at most two
  kernels share the SMs, the running one and the next one waiting.
A kernel launched without the attribute (cuBLAS, inductor's kernels) waits for the one before it as usual. Both
instructions are no-ops for a kernel launched without PDL. Recorded in CUDA graphs as programmatic edges (CUDA
12.3+), which is where decode runs.

Off unless ``COHERE_FX_PDL=1`` (read at each launch). Measured on an H100 (Command-R7B engine decode, one tree,
benchmarks/results/decode-command-r7b-20261206T1500*.json and -T150118Z): batch 1 162.8 decode tok/s with it vs
161.8 without, batch 16 2215.5 vs 2352.7. ``COHERE_FX_PDL_TRIGGER=exit`` (the next kernel launches when this one's
programs exit, not when they pass the wait), ``COHERE_FX_PDL_SKIP`` (kernel families launched without it) and
``COHERE_FX_PDL_PREFETCH`` (``prefetch_bytes``) are the knobs of the experiments that look for the cause.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """The first statement of a kernel launched with ``dependent_launch``: wait for the kernel before it (its
    writes visible), then let the next kernel launch."""
    if PDL:
        gdc_wait()
        if PDL == 1:  # else the next kernel launches when this one's programs have exited
            gdc_launch_dependents()


@triton.jit
def prefetch_rows(ptr, n0, N, K, stride, BLOCK_N: tl.constexpr, BYTES: tl.constexpr):
    """Ask L2 for the first BYTES of rows ``n0 .. n0 + BLOCK_N`` (clamped to N) of a row-major [N, K] matrix: what a
    weight-streaming program may do before ``wait_for_inputs``, while the kernel before it ends (no kernel of a
    decode step writes a weight, and a prefetch returns nothing that a later write could leave stale)."""
    PER_LINE: tl.constexpr = 1024 // ptr.dtype.element_ty.primitive_bitwidth  # elements in a 128-byte line
    LINES: tl.constexpr = BYTES // 128
    rows = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)
    cols = tl.minimum(tl.arange(0, LINES) * PER_LINE, K - 1)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptr + rows[:, None] * stride + cols[None, :]],
                              dtype=tl.int32, is_pure=False, pack=1)


@functools.lru_cache
def _supported(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def enabled() -> bool:
    return os.environ.get("COHERE_FX_PDL", "0") == "1"


def prefetch_bytes(t: torch.Tensor, kernel: str) -> int:
    """Bytes of each weight row a program asks L2 for before it waits (``prefetch_rows``): only with PDL, from
    ``COHERE_FX_PDL_PREFETCH`` (0: none)."""
    return int(os.environ.get("COHERE_FX_PDL_PREFETCH", "0")) if dependent_launch(t, kernel)["PDL"] else 0


def dependent_launch(t: torch.Tensor, kernel: str) -> dict:
    """Launch keywords of a kernel that calls ``wait_for_inputs(PDL)``, for tensors on ``t``'s device: PDL on a
    CUDA device of compute capability 9.0 or newer with ``COHERE_FX_PDL=1``, off elsewhere (the interpreter
    runs no inline PTX)."""
    skipped = os.environ.get("COHERE_FX_PDL_SKIP", "").split(",")
    if t.is_cuda and enabled() and kernel not in skipped and _supported(t.device):
        return {"PDL": 2 if os.environ.get("COHERE_FX_PDL_TRIGGER") == "exit" else 1, "launch_pdl": True}
    return {"PDL": 0}
