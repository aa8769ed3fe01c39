"""Programmatic dependent launch (PDL, sm_90+): a decode step's kernels start while the kernel before them ends.

Why: a Command-R7B decode step is ~260 dependent launches, most of them weight streams of 50-100 us. Between two of
them the device drains the first kernel's last programs, then launches and ramps up the next: on an H100 at 16
sequences the step's kernels sum to ~0.2 ms less than the step (a profiled run: 6.86 ms a step, kernels ~6.66 ms,
benchmarks/results/decode-command-r7b-20261206T155127Z.json). Launched with PDL, the next kernel's programs are
scheduled onto the SMs the last programs of the kernel before it leave free, and wait there
(``griddepcontrol.wait``) until it has finished and its writes are visible.

Safety rests on two rules that every kernel launched with ``dependent_launch`` keeps:
- it calls ``wait_for_inputs(PDL)`` before its first load or store of global memory, so it reads nothing the kernel
  before it still writes and writes nothing that kernel still reads;
- that call also signals its own dependents (``griddepcontrol.launch_dependents``) only after the wait: at most two
  kernels share the SMs, the running one and the next one waiting.
A kernel launched without the attribute (cuBLAS, inductor's kernels, paged attention) waits for the one before it
as usual. Both instructions are no-ops for a kernel launched without PDL. Recorded in CUDA graphs as programmatic
edges (CUDA 12.3+), which is where decode runs.

Which kernels: LayerNorm, decode_linear, rope_kv_write, SwiGLU and decode_residual. Not paged attention: its
programs hold ~190 KB of shared memory each (pipelined 128-token K/V tiles), and with it launched this way
Command-R7B Engine decode at 16 sequences ran at 2215.5 decode tok/s against 2352.7 without PDL (H100, tree 8cdf720,
benchmarks/results/reverted/decode-command-r7b-20261206T150014Z.json and
benchmarks/results/decode-command-r7b-20261206T150118Z.json; batch 1 162.8 vs 161.8). On a tree
with one more (since dropped) fusion, leaving paged attention out turned that loss into a gain: 2265.9 vs 2245.2
(benchmarks/results/reverted/decode-command-r7b-20261206T154800Z.json and -T154638Z.json). Off unless
``COHERE_FX_PDL=1`` (read at each launch) until main's own A/B (``gpu_suite.sh ab-pdl``) says otherwise.
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
        gdc_launch_dependents()


@functools.lru_cache
def _supported(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def dependent_launch(t: torch.Tensor) -> dict:
    """Launch keywords of a kernel that calls ``wait_for_inputs(PDL)``, for tensors on ``t``'s device: PDL on a
    CUDA device of compute capability 9.0 or newer with ``COHERE_FX_PDL=1``, off elsewhere (the interpreter
    runs no inline PTX)."""
    if t.is_cuda and os.environ.get("COHERE_FX_PDL", "0") == "1" and _supported(t.device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
