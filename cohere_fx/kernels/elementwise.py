"""What the flat elementwise kernels (``swiglu``, ``parallel_residual``) share: input checks and the 1-D grid.

Such a kernel sees its tensors as one flat contiguous array: each program handles ``BLOCK`` consecutive
elements with int64 offsets, so any shape and any element count (not a multiple of ``BLOCK`` included) works.
This module does not import Triton: the ops check their inputs with it on every device.
"""
import torch

# Elements per program: 8 per thread at 4 warps, i.e. 16-byte loads and stores of bf16. Measured on an H100 at
# r7b shapes (4096 tokens, bf16): 1024 to 4096 elements at 4 or 8 warps are all within 2 % (~3.0 TB/s).
BLOCK = 1024
NUM_WARPS = 4
# The kernels compute in fp32: wider inputs would lose precision.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_same(name: str, *tensors: torch.Tensor) -> None:
    """The ops take tensors of one shape, one floating dtype, one device (no broadcasting, no promotion)."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{name}: inputs differ: {tuple(first.shape)} {first.dtype} {first.device} vs "
                             f"{tuple(t.shape)} {t.dtype} {t.device}")
    if not first.is_floating_point():
        raise ValueError(f"{name}: dtype {first.dtype} is not floating point")


def check_kernel_inputs(name: str, *tensors: torch.Tensor) -> None:
    """What a launcher takes: ``check_same``, and a dtype of ``DTYPES``."""
    check_same(name, *tensors)
    if tensors[0].dtype not in DTYPES:
        raise ValueError(f"{name}: dtype {tensors[0].dtype} is not one of {DTYPES}")


def grid(numel: int) -> tuple[int]:
    return ((numel + BLOCK - 1) // BLOCK,)
