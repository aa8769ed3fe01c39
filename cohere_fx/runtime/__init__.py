"""Inference runtime: the paged KV cache (a ``transformers.Cache``) and the block allocator behind it."""
from cohere_fx.runtime.block_allocator import BlockAllocator, OutOfBlocksError
from cohere_fx.runtime.paged_cache import PagedKVCache

__all__ = ["BlockAllocator", "OutOfBlocksError", "PagedKVCache"]
