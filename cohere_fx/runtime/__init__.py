"""Inference runtime: the paged KV cache (a ``transformers.Cache``) and its block allocator, the DecodeRunner
(one compiled, CUDA-graph-captured decode step per batch bucket) and the continuous-batching Engine on top."""
from cohere_fx.runtime.block_allocator import BlockAllocator, OutOfBlocksError
from cohere_fx.runtime.decode_runner import DecodeRunner
from cohere_fx.runtime.engine import Engine, RequestError, RequestOutput
from cohere_fx.runtime.paged_cache import PagedKVCache
from cohere_fx.runtime.sampling import SamplingParams

__all__ = ["BlockAllocator", "DecodeRunner", "Engine", "OutOfBlocksError", "PagedKVCache", "RequestError",
           "RequestOutput", "SamplingParams"]
