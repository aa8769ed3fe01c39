"""Kernel benchmarks: each torch.ops.cohere_fx op against the HF math it replaces.

eager: the HF code itself (CohereLayerNorm, apply_rotary_pos_emb, CohereMLP's ``act_fn(gate) * up``, the
decoder layer's residual sum) or HF's loss math, on the tensors the HF graph hands it; inductor: torch.compile
of that same function (what inductor makes of the math); cohere_fx: the op. paged_attention also runs torch's own
paged decode, flex_attention over ``PagedAttention`` pages (flex-paged). Forward alone and forward +
backward (torch.autograd.grad with fixed output gradients). What each system returns, the outputs or the input
gradients, is checked against eager once (``rel_err`` = ||out - ref|| / ||ref||, worst tensor): a fast wrong
kernel must not look like a win.

Bytes (the GB/s column) are the minimum traffic: forward reads every input and writes every output; the
backward reads the inputs again and the output gradients, and writes the input gradients.
"""
import sys

import torch
import torch.nn.functional as F

from cohere_fx.bench.models import Shape, config_for
from cohere_fx.bench.systems import run_systems
from cohere_fx.bench.timing import device_limits, measure
from cohere_fx.bench.workloads import limit_ms, rates

KERNELS = ("layer_norm", "qk_norm_rope", "rope", "scaled_cross_entropy", "swiglu", "embedding", "parallel_residual",
           "paged_attention", "decode_linear", "lora")
# The backward of parallel_residual is its output gradient, passed on unchanged: no kernel to time.
# paged_attention and decode_linear are decode ops: no backward.
FORWARD_ONLY = ("parallel_residual", "paged_attention", "decode_linear")
CASE_OPS = {"lora": ("lora_shrink", "lora_expand")}  # cases timing more than the op of their name
PAGE = 16  # tokens per KV page in the paged_attention case (DecodeRunner's default)
IGNORE_INDEX = -100


class _NormState:
    """What CohereLayerNorm.forward reads from its module (a plain class: Dynamo traces its construction without
    a graph break, which SimpleNamespace would cause)."""

    def __init__(self, weight, eps):
        self.weight, self.variance_epsilon = weight, eps


def _hf_norm(x, weight, eps):
    """CohereLayerNorm.forward itself, run on the benchmark's own weight tensor (a leaf we take gradients of)."""
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm

    return CohereLayerNorm.forward(_NormState(weight, eps), x)


def _case(name, shape: Shape, config, batch, seq, device, dtype):
    """(inputs, indices of differentiable inputs, HF reference fn, fn calling the op)."""
    from transformers.activations import ACT2FN
    from transformers.models.cohere.modeling_cohere import CohereRotaryEmbedding, apply_rotary_pos_emb

    def rand(*size, dt=dtype):
        return torch.randn(*size, device=device, dtype=dt)

    eps = config.layer_norm_eps
    ops = torch.ops.cohere_fx
    if name == "layer_norm":
        x, w = rand(batch, seq, shape.hidden), 1 + 0.1 * rand(shape.hidden)
        return [x, w], [0, 1], lambda x, w: _hf_norm(x, w, eps), lambda x, w: ops.layer_norm(x, w, eps)
    if name == "scaled_cross_entropy":
        rows = batch * seq
        labels = torch.randint(0, shape.vocab, (rows,), device=device)
        labels[::16] = IGNORE_INDEX  # some ignored rows, as padding and the shifted last token give
        scale = config.logit_scale
        return ([rand(rows, shape.vocab), labels], [0],
                lambda z, y: F.cross_entropy((z * scale).float(), y, ignore_index=IGNORE_INDEX, reduction="none"),
                lambda z, y: ops.scaled_cross_entropy(z, y, scale, IGNORE_INDEX)[0])
    if name == "swiglu":  # CohereMLP: act_fn(gate_proj(x)) * up_proj(x), on the two projections' outputs
        act = ACT2FN[config.hidden_act]
        return ([rand(batch, seq, shape.ffn), rand(batch, seq, shape.ffn)], [0, 1],
                lambda g, u: act(g) * u, lambda g, u: ops.swiglu(g, u))
    if name == "embedding":  # the token lookup; what differs is its backward, the [V, H] weight gradient (and the
        # peak memory column: inductor's decomposition accumulates it in an fp32 [V, H] buffer)
        ids = torch.randint(0, shape.vocab, (batch, seq), device=device)
        return ([ids, rand(shape.vocab, shape.hidden)], [1], lambda i, w: F.embedding(i, w, 0),
                lambda i, w: ops.embedding(i, w, 0))
    if name == "parallel_residual":  # CohereDecoderLayer: residual + hidden_states_attention + hidden_states_mlp
        return ([rand(batch, seq, shape.hidden) for _ in range(3)], [0, 1, 2],
                lambda r, a, m: r + a + m, lambda r, a, m: ops.parallel_residual(r, a, m))
    if name == "paged_attention":
        return _paged_case(shape, batch, seq, device, rand)
    if name == "decode_linear":  # one decode step's q, k, v, gate and up projections of `batch` tokens
        sizes = (shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.kv_heads * shape.head_dim,
                 shape.ffn, shape.ffn)
        weights = [rand(n, shape.hidden) / shape.hidden ** 0.5 for n in sizes]
        return ([rand(batch, 1, shape.hidden), *weights], [],
                lambda x, *ws: tuple(F.linear(x, w) for w in ws), lambda x, *ws: tuple(ops.decode_linear(x, ws)))
    if name == "lora":  # a PEFT LoRA gate_proj on a bf16 base (r=16, fp32 adapters, the train bench's alpha = r)
        low = torch.bfloat16 if dtype == torch.float32 else dtype  # the ops serve low-precision bases only
        x, base = rand(batch, seq, shape.hidden, dt=low), rand(batch, seq, shape.ffn, dt=low)
        a, b = rand(16, shape.hidden, dt=torch.float32) / 64, rand(shape.ffn, 16, dt=torch.float32) / 4
        return ([x, a, b, base], [0, 1, 2, 3],
                lambda x, a, b, base: (base + F.linear(F.linear(x.to(a.dtype), a), b) * 1.0).to(base.dtype),
                lambda x, a, b, base: ops.lora_expand(base, ops.lora_shrink(x, a), b, 1.0, False))
    # q, k as q_proj/k_proj(h).view(B, S, heads, D): the tensors the HF graph hands to q_norm (or transposes).
    q, k = rand(batch, seq, shape.heads, shape.head_dim), rand(batch, seq, shape.kv_heads, shape.head_dim)
    positions = torch.arange(seq, device=device)[None].expand(batch, seq)
    with torch.device(device):
        cos, sin = CohereRotaryEmbedding(config)(q, positions)
    if name == "rope":
        return ([q, k, cos, sin], [0, 1],
                lambda q, k, c, s: apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), c, s),
                lambda q, k, c, s: ops.rope(q, k, c, s))
    qw, kw = 1 + 0.1 * rand(shape.heads, shape.head_dim), 1 + 0.1 * rand(shape.kv_heads, shape.head_dim)

    def reference(q, k, c, s, qw, kw):
        q, k = _hf_norm(q, qw, eps).transpose(1, 2), _hf_norm(k, kw, eps).transpose(1, 2)
        return apply_rotary_pos_emb(q, k, c, s)

    return ([q, k, cos, sin, qw, kw], [0, 1, 4, 5], reference,
            lambda q, k, c, s, qw, kw: ops.qk_norm_rope(q, k, c, s, qw, kw, eps))


def _paged_case(shape: Shape, batch, context, device, rand):
    """One decode step of ``batch`` sequences of ``context`` tokens each, their pages scattered over the pools.
    eager: what the decode graph computes before the rewrite (the cache's block-table gather, HF's repeat_kv,
    SDPA with the cache's length mask); cohere_fx: the op reading the pages in place."""
    from transformers.models.cohere.modeling_cohere import repeat_kv

    from cohere_fx.runtime.paged_cache import cdiv, gather_pages, length_mask

    width = cdiv(context, PAGE)
    pools = [rand(batch * width, PAGE, shape.kv_heads, shape.head_dim) for _ in range(2)]
    tables = torch.randperm(batch * width, device=device).view(batch, width).to(torch.int32)
    lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    q, scale, n_rep = rand(batch, shape.heads, shape.head_dim), shape.head_dim ** -0.5, shape.heads // shape.kv_heads

    def reference(q, k_pool, v_pool, tables, lens):
        k, v = gather_pages(k_pool, tables), gather_pages(v_pool, tables)
        mask = length_mask(lens, torch.arange(k.shape[2], device=q.device))
        out = F.scaled_dot_product_attention(q[:, :, None], repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                             attn_mask=mask, scale=scale)
        return out[:, :, 0]

    return ([q, *pools, tables, lens], [], reference,
            lambda q, k_pool, v_pool, tables, lens: torch.ops.cohere_fx.paged_attention(
                q, k_pool, v_pool, tables, lens, scale, 0))


FLEX_PAGE = 128  # tokens per page for flex-attention's paged decode: its block-mask column size (its default)


def _flex_paged(q, k_pool, v_pool, tables, lens):
    """torch's own paged decode on the same step (issue 5's peer): the same sequences copied into the layout of
    ``torch.nn.attention.experimental._paged_attention.PagedAttention`` (one [1, Hkv, pages * FLEX_PAGE, D] cache,
    its page table), a length block mask converted to physical pages, ``flex_attention`` compiled with GQA. Returns
    the timed call (its output is checked like the others')."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from cohere_fx.runtime.paged_cache import cdiv, gather_pages

    k, v = gather_pages(k_pool, tables), gather_pages(v_pool, tables)  # [B, Hkv, L, D], logical order
    batch, kv_heads, length, head_dim = k.shape
    per_seq = cdiv(length, FLEX_PAGE)
    paged = PagedAttention(batch * per_seq, FLEX_PAGE, batch, device=str(q.device))
    for b in range(batch):
        paged.reserve(torch.tensor(b, device=q.device), torch.tensor(length, device=q.device))
    k_cache = k.new_zeros(1, kv_heads, batch * per_seq * FLEX_PAGE, head_dim)
    v_cache = torch.zeros_like(k_cache)
    positions = torch.arange(length, device=q.device)[None].expand(batch, -1)
    paged.assign(torch.arange(batch, device=q.device), positions, k, v, k_cache, v_cache)
    lens = lens.long()
    logical = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lens[b], batch, None, 1, per_seq * FLEX_PAGE,
                                BLOCK_SIZE=(FLEX_PAGE, FLEX_PAGE), device=q.device)
    block_mask = paged.convert_logical_block_mask(logical, kv_len=lens)
    flex = torch.compile(flex_attention)
    scale = q.shape[-1] ** -0.5
    return lambda: flex(q[:, :, None], k_cache, v_cache, block_mask=block_mask, scale=scale, enable_gqa=True)[:, :, 0]


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _moved_bytes(name, inputs, refs, grads_out, wrt) -> int:
    """Bytes a kernel must move at least: its inputs and outputs once, and in the backward the inputs again, the
    output gradients and the input gradients. A lookup reads only the rows it looks up (as many as its output),
    not the whole table."""
    read = inputs if name != "embedding" else [inputs[0], *refs]
    nbytes = _nbytes(read) + _nbytes(refs)
    if grads_out:
        nbytes += _nbytes(read) + _nbytes(grads_out) + _nbytes(wrt)
    return nbytes


def _rel_err(outs, refs) -> float:
    worst = 0.0
    for out, ref in zip(outs, refs):
        if out.shape != ref.shape:
            raise RuntimeError(f"output shape {tuple(out.shape)} differs from the HF reference's {tuple(ref.shape)}")
        ref = ref.double()
        worst = max(worst, ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item())
    return worst


def _op_available(name):
    """None, or why torch.ops.cohere_fx.<name> cannot be run."""
    try:
        import cohere_fx.ops  # noqa: F401 - registers the ops
    except Exception as e:  # noqa: BLE001
        return f"import cohere_fx.ops failed: {type(e).__name__}: {e}"
    for op in CASE_OPS.get(name, (name,)):
        if not hasattr(torch.ops.cohere_fx, op):
            return f"op cohere_fx::{op} is not registered (not in cohere_fx.ops yet)"
    return None


def _bench_flex(inputs, expected, args, nbytes, limits) -> dict:
    with torch.no_grad():
        fn = _flex_paged(*inputs)
        result = measure(lambda: (fn(),), args.device, args.iters, args.warmup, "paged_attention flex-paged",
                         cuda_graph=True)
        result["rel_err"] = _rel_err((fn(),), expected)
    result["note"] = f"torch flex_attention over PagedAttention pages of {FLEX_PAGE} tokens"
    return {**result, **rates(0, nbytes, result["ms"], limits)}


def kernels(args) -> dict:
    config = config_for(args.preset, args.layers, args.model, args.attn)
    shape = Shape.of(config)
    limits = device_limits(args.device, args.dtype)
    torch.manual_seed(args.seed)
    cases = []
    for name in args.kernels:
        inputs, diff, reference, op = _case(name, shape, config, args.batch, args.seq, args.device, args.dtype)
        with torch.no_grad():
            refs = _as_tuple(reference(*inputs))
        missing = _op_available(name)
        if missing:
            print(f"[kernels] {name}: cohere_fx skipped: {missing}", file=sys.stderr)
        for direction in args.directions:
            backward = direction == "fwd+bwd"
            if backward and name in FORWARD_ONLY:
                continue
            grads_out = [torch.randn_like(r) for r in refs] if backward else []
            leaves = [t.detach().requires_grad_(backward and i in diff) for i, t in enumerate(inputs)]
            wrt = [leaves[i] for i in diff]
            nbytes = _moved_bytes(name, inputs, refs, grads_out, wrt)

            def run(fn):
                """The outputs (fwd) or the input gradients (fwd+bwd): what is timed is what is checked."""
                if backward:
                    return _as_tuple(torch.autograd.grad(fn(*leaves), wrt, grads_out))
                with torch.no_grad():
                    return _as_tuple(fn(*leaves))

            expected = run(reference)

            def bench_one(system):
                if system == "cohere_fx" and missing:
                    raise RuntimeError(missing)
                fn = {"eager": reference, "inductor": torch.compile(reference), "cohere_fx": op}[system]
                label = f"{name} {direction} {system}"
                result = measure(lambda: run(fn), args.device, args.iters, args.warmup, label, cuda_graph=True)
                if result["timing"] == "cuda graph":
                    result["note"] = "CUDA-graph replays (launch overhead excluded)"
                if system != "eager":  # after timing, so that the first timed call is the one that compiles
                    result["rel_err"] = _rel_err(run(fn), expected)
                return {**result, **rates(0, nbytes, result["ms"], limits)}

            results = run_systems(args.systems, bench_one, args.device, f"kernels {name} {direction}",
                                  compiled=("inductor",))
            if name == "paged_attention":
                results.update(run_systems(["flex-paged"], lambda _: _bench_flex(inputs, expected, args, nbytes,
                                                                               limits), args.device,
                                           f"kernels {name} {direction}", compiled=()))
            cases.append({"name": f"{name} {direction}", "metric": "ms", "results": results,
                          "limit": limit_ms(0, nbytes, limits),
                          "params": {"shapes": [list(t.shape) for t in inputs], "bytes": nbytes}})
    return {"workload": "kernels", "model": {"preset": None if args.model else args.preset, "path": args.model,
                                              "hidden": shape.hidden, "heads": shape.heads,
                                              "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
                                              "vocab": shape.vocab},
            "limits": limits,
            "params": {"batch": args.batch, "seq": args.seq, "kernels": list(args.kernels),
                       "directions": list(args.directions)},
            "cases": cases}
