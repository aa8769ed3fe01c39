"""``rope_kv_write``: in a decode step, ``qk_norm_rope`` (or ``rope``) followed by the paged cache's write of the new
token's k and v -> one cohere_fx.rope_kv_write that rotates q and k and stores k and v into their pages.

The search is the op the ``qk_norm_rope``/``rope`` pattern wrote (this pattern runs after them) and
``PagedDecodeView.update``'s two ``write_rows`` calls as Dynamo traces them (``pool[slots // block_size,
slots % block_size] = rows.to(pool.dtype)``), so it matches the runner's decode step and nothing else. Its
outputs are the rotated q and the two writes: the op takes the writes' place in the graph, so paged attention,
which reads the pools, still comes after them. Cohere2's global layers have no RoPE: their writes stay as they are.

Checks: one token per sequence (S = 1), the rotated k is read by nothing but the write, the block size is the
pools', and the pools, q, k and v share one dtype (the write's cast is then exact, as in the kernel).
"""
import operator

import torch

from cohere_fx.patterns.base import Match, Pattern, fake_value

ops = torch.ops.cohere_fx
# Dynamo records ``pool[index] = rows`` as a call of operator.setitem; symbolic_trace records it as one only when
# the call is a leaf (a Proxy takes no item assignment).
setitem = operator.setitem
torch.fx.wrap("setitem")


def search_qk_norm_rope(query, key, value, cos, sin, q_weight, k_weight, eps, k_pool, v_pool, slots, block_size,
                        dtype):
    rotated = ops.qk_norm_rope.default(query, key, cos, sin, q_weight, k_weight, eps)
    write_k = setitem(k_pool, (slots // block_size, slots % block_size), rotated[1][:, :, -1].to(dtype))
    write_v = setitem(v_pool, (slots // block_size, slots % block_size), value[:, :, -1].to(dtype))
    return rotated[0], write_k, write_v


def search_rope(query, key, value, cos, sin, k_pool, v_pool, slots, block_size, dtype):
    rotated = ops.rope.default(query, key, cos, sin)
    write_k = setitem(k_pool, (slots // block_size, slots % block_size), rotated[1][:, :, -1].to(dtype))
    write_v = setitem(v_pool, (slots // block_size, slots % block_size), value[:, :, -1].to(dtype))
    return rotated[0], write_k, write_v


def check(match: Match):
    q, k, v = match.val("query"), match.val("key"), match.val("value")
    pools = [match.val("k_pool"), match.val("v_pool")]
    if any(t is None for t in (q, k, v, *pools)):
        return "no traced shapes"
    if q.dim() != 4 or q.shape[1] != 1:
        return f"q {tuple(q.shape)} is not one token per sequence"
    if any(p.dim() != 4 or p.shape[1] != match["block_size"] for p in pools):
        return f"block size {match['block_size']} is not the pools' ({tuple(pools[0].shape)})"
    dtypes = {t.dtype for t in (q, k, v, *pools)} | {match["dtype"]}
    if len(dtypes) != 1:
        return f"q, k, v, the pools and the write's cast differ in dtype: {sorted(map(str, dtypes))}"
    if any(fake_value(match[name]).requires_grad for name in ("query", "key", "value")):
        return "q, k or v requires grad (the op has no backward)"
    return None


def replace(match: Match):
    norm = (match["q_weight"], match["k_weight"], match["eps"]) if "q_weight" in match.bindings else (None, None,
                                                                                                     0.0)
    node = match.call(ops.rope_kv_write.default, match["query"], match["key"], match["value"], match["cos"],
                      match["sin"], norm[0], norm[1], norm[2], match["k_pool"], match["v_pool"], match["slots"])
    return node, node, node  # the op is q's value and both writes


PATTERN = Pattern("rope_kv_write", (search_qk_norm_rope, search_rope), replace, check,
                  literals=("eps", "block_size", "dtype"))
