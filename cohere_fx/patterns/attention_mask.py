"""Proofs about attention masks and K/V layouts that the attention patterns rely on.

Under torch.compile HF materialises its masks from position comparisons (``kv_idx <= q_idx``, and for sliding
layers ``kv_idx > q_idx - window``), which keeps SDPA off the flash kernel. Such a mask depends on nothing but
constants, so instead of matching one spelling of it we evaluate it and compare it with the causal (or banded)
mask it must equal. A mask that reads an input (padding) is not constant and is left alone.
"""
from typing import Optional

import torch
import torch.fx

from cohere_fx.patterns.base import known_equal

_MAX_MASK_NODES = 64


def constant_value(node: torch.fx.Node) -> Optional[torch.Tensor]:
    """The value of ``node`` if it is computed from constants only (no graph input, no parameter), else None.
    A subgraph input linked to the outer node passed to it (``meta["cohere_fx_outer"]``, a checkpointed layer's
    mask) is evaluated there."""
    env: dict = {}

    def value(n: torch.fx.Node):
        if n in env:
            return env[n]
        if n.op == "placeholder" and "cohere_fx_outer" in n.meta:
            env[n] = value(n.meta["cohere_fx_outer"])
            return env[n]
        if n.op not in ("call_function", "call_method") or len(env) > _MAX_MASK_NODES:
            raise _NotConstant
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), value)
        env[n] = n.target(*args, **kwargs) if n.op == "call_function" else getattr(args[0], n.target)(*args[1:],
                                                                                                      **kwargs)
        return env[n]

    try:
        result = value(node)
    except _NotConstant:
        return None
    return result if isinstance(result, torch.Tensor) else None


class _NotConstant(Exception):
    """The mask reads something that is not a constant computation."""


def mask_window(mask: torch.Tensor, q_len: int, kv_len: int) -> Optional[int]:
    """If ``mask`` (broadcastable to [.., q_len, kv_len]) is causal over the last ``window`` positions, for
    every batch and head, return ``window`` (``kv_len`` or more: plain causal); else None."""
    if mask.dtype != torch.bool or q_len != kv_len:
        return None
    rows = torch.arange(q_len, device=mask.device)[:, None]
    cols = torch.arange(kv_len, device=mask.device)[None, :]
    per_row = mask.reshape(-1, q_len, kv_len).sum(-1)  # visible keys per query row
    window = int(per_row.max().item()) if per_row.numel() else 0
    band = (cols <= rows) & (cols > rows - window)
    return window if bool((mask == band).all()) else None


def mask_is_all_true(mask: torch.Tensor) -> bool:
    return mask.dtype == torch.bool and bool(mask.all())


def unrepeated_kv(node: torch.fx.Node) -> tuple[torch.fx.Node, int]:
    """Look through HF's ``repeat_kv`` (``x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv*n_rep, s, d)``):
    returns the K/V node before the repeat and n_rep (1 when there is no repeat)."""
    if not (node.op == "call_method" and node.target == "reshape" and len(node.users) == 1):
        return node, 1
    expand = node.args[0]
    if not (isinstance(expand, torch.fx.Node) and expand.op == "call_method" and expand.target == "expand"
            and len(expand.users) == 1):
        return node, 1
    unsqueeze = expand.args[0]
    full = (slice(None),)
    if not (isinstance(unsqueeze, torch.fx.Node) and unsqueeze.op == "call_function"
            and unsqueeze.target is __import__("operator").getitem and len(unsqueeze.users) == 1
            and unsqueeze.args[1] == full * 2 + (None,) + full * 2):
        return node, 1
    source = unsqueeze.args[0]
    out_val, in_val = node.meta.get("example_value"), source.meta.get("example_value")
    if out_val is None or in_val is None or in_val.dim() != 4 or out_val.shape[1] % in_val.shape[1]:
        return node, 1
    n_rep = out_val.shape[1] // in_val.shape[1]
    # exact only if the reshape lays each kv head's n_rep copies side by side (what repeat_kv does)
    b, kv, s, d = in_val.shape
    if not known_equal(tuple(out_val.shape), (b, kv * n_rep, s, d)):
        return node, 1
    if any(isinstance(a, torch.fx.Node) for a in expand.args[1:]) or not known_equal(
            tuple(expand.args[1:]), (b, kv, n_rep, s, d)):
        return node, 1
    return source, n_rep
