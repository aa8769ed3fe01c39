"""paged_attention: the split-K Triton kernel (interpreter on CPU) and the op, against a dense fp64 reference that
rebuilds each sequence's contiguous K/V from its pages and repeats it for GQA the way HF's repeat_kv does."""
import pytest
import torch

import cohere_fx.ops  # noqa: F401  (registers torch.ops.cohere_fx.*)
from cohere_fx.kernels.paged_attention import paged_attention_fwd
from cohere_fx.ops.paged_attention import paged_attention_reference


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs the kernel in Triton's interpreter


def make_inputs(lens, heads, kv_heads, head_dim, block_size, dtype=torch.float32, device=DEVICE, spare_blocks=3):
    """Random pools; each sequence's pages scattered over the pool (shuffled ids), a spare table column."""
    batch = len(lens)
    width = max(-(-n // block_size) for n in lens) + 1
    num_blocks = batch * width + spare_blocks
    tables = torch.randperm(num_blocks)[: batch * width].view(batch, width).to(torch.int32)
    q = torch.randn(batch, heads, head_dim, dtype=dtype)
    k_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return [t.to(device) for t in (q, k_pool, v_pool, tables, seq_lens)]


def dense_reference(q, k_pool, v_pool, tables, seq_lens, scale, window):
    block_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = q.shape[1] // kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(max(n - window, 0) if window else 0, n)
        if len(pos) == 0:
            continue
        blocks = tables[b].cpu().long()[pos // block_size]
        k = k_pool.cpu()[blocks, pos % block_size].double().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_pool.cpu()[blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,nhd->hn", q[b].cpu().double(), k) * scale).softmax(-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, v)
    return out


def rel_err(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


CASES = {  # heads, kv_heads, head_dim, window, seq_lens
    "gqa": (4, 2, 16, 0, [1, 13, 24]),
    "mha": (2, 2, 16, 0, [7, 16]),
    "window": (4, 1, 16, 5, [3, 5, 22]),
    "head_dim_24": (8, 2, 24, 0, [9, 2]),
    "empty_row": (4, 2, 16, 4, [0, 11]),  # a padded slot of a batch bucket reads as zeros
}


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_dense_fp64(case, parts):
    heads, kv_heads, head_dim, window, lens = CASES[case]
    args = make_inputs(lens, heads, kv_heads, head_dim, block_size=4)
    out = paged_attention_fwd(*args, 0.3, window, parts=parts, tile_n=16)
    ref = dense_reference(*args, 0.3, window)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["gqa", "window"])
def test_kernel_half_relative_error(case):
    """fp16 stands in for bf16 here: the interpreter's tl.dot is wrong for bf16 (raw bits); bf16 runs on the GPU."""
    heads, kv_heads, head_dim, window, lens = CASES[case]
    args = make_inputs(lens, heads, kv_heads, head_dim, block_size=4, dtype=torch.float16)
    out = paged_attention_fwd(*args, 0.25, window, parts=2, tile_n=16)
    assert out.dtype == torch.float16
    assert rel_err(out, dense_reference(*args, 0.25, window)) < 1e-2


def test_op_bf16_on_cpu():
    args = make_inputs([6, 19], 4, 2, 16, block_size=4, dtype=torch.bfloat16)
    out = torch.ops.cohere_fx.paged_attention(*args, 0.25, 0)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, dense_reference(*args, 0.25, 0)) < 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_torch_reference_matches_dense_fp64(case):
    heads, kv_heads, head_dim, window, lens = CASES[case]
    args = make_inputs(lens, heads, kv_heads, head_dim, block_size=4, dtype=torch.float64)
    torch.testing.assert_close(paged_attention_reference(*args, 0.3, window).cpu(), dense_reference(*args, 0.3, window))


def test_op_noncontiguous_q_and_opcheck():
    q, k_pool, v_pool, tables, lens = make_inputs([5, 12], 4, 2, 16, block_size=4)
    q_strided = torch.randn(2, 16, 4, device=DEVICE).transpose(1, 2)  # [B, H, D], head_dim not innermost
    out = torch.ops.cohere_fx.paged_attention(q_strided, k_pool, v_pool, tables, lens, 0.25, 0)
    torch.testing.assert_close(out.double().cpu(), dense_reference(q_strided, k_pool, v_pool, tables, lens, 0.25, 0),
                               atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.cohere_fx.paged_attention.default, (q, k_pool, v_pool, tables, lens, 0.25, 3))


def test_op_rejects_bad_arguments():
    q, k_pool, v_pool, tables, lens = make_inputs([5, 12], 4, 2, 16, block_size=4)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.cohere_fx.paged_attention(q, k_pool, v_pool, tables.long(), lens, 0.25, 0)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        torch.ops.cohere_fx.paged_attention(q[:, :3], k_pool, v_pool, tables, lens, 0.25, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 1024])
@pytest.mark.parametrize("batch", [1, 16])
def test_cuda_real_shapes(batch, window):
    """Command-R7B attention shapes (32 heads, 8 kv heads, head_dim 128), bf16, 4k context, block 16."""
    lens = torch.randint(3000, 4097, (batch,)).tolist()
    args = make_inputs(lens, 32, 8, 128, block_size=16, dtype=torch.bfloat16, device="cuda")
    out = torch.ops.cohere_fx.paged_attention(*args, 128**-0.5, window)
    assert rel_err(out, dense_reference(*args, 128**-0.5, window)) < 1e-2
