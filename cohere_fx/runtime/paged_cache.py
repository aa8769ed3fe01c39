"""``PagedKVCache``: a ``transformers.Cache`` whose keys and values live in fixed-size pages of preallocated pools.

Why pages: a dense cache must be sized (or regrown) for the longest length a sequence may reach; pages let many
sequences of different lengths share one pool, finished sequences hand their pages back, and Cohere2's sliding
layers recycle the pages that fall out of the window, so their memory is bounded by the window, not the length.
The pools, block tables and lengths are device tensors in the layout ``torch.ops.cohere_fx.paged_attention``
reads in place (compiled decode). In eager, ``update`` also returns the gathered K/V exactly as ``DynamicCache``
(full layers) or ``DynamicSlidingWindowLayer`` (sliding layers) would, so stock attention and HF's mask sizing
work unchanged.

Layout:
- per layer, ``k_pool`` / ``v_pool`` ``[num_blocks, block_size, kv_heads, head_dim]``;
- per layer kind (all full layers share one, all sliding layers another, since they see the same positions):
  ``block_tables [max_seqs, max_blocks_per_seq]`` int32, column ``pos // block_size``; an entry with no page
  behind it holds 0, so a stray read stays inside the pool;
- ``seq_lens [max_seqs]`` int32: tokens written per sequence (the logical length, the same for every layer).
Row ``i`` is sequence ``i``; in ``generate`` that is batch row ``i``.

Two ways in: HF ``generate`` (eager, ``update`` plans pages itself, off the graph), and the runner's traced decode
step (``PagedDecodeView``: the host grows rows with ``grow``, the graph only writes and reads pages). Both share
the page bookkeeping and the ``write_rows`` store.
"""
import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from cohere_fx.runtime.block_allocator import BlockAllocator, OutOfBlocksError


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def to_device(values, device, dtype: torch.dtype = torch.int64) -> Tensor:
    """``values`` (a list, or a CPU tensor) as a ``dtype`` tensor on ``device``. On CUDA through pinned memory, so
    the copy is asynchronous: from pageable memory it would wait for the GPU to finish its queued work (a decode
    step, say)."""
    host = values.to(dtype) if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass
class _Step:
    """Slot indices of one forward step for one layer kind, computed once and shared by its layers."""

    write_slots: Tensor  # [B * n_write] flat pool rows that receive the last n_write new tokens
    n_write: int
    read_slots: Tensor  # [B, n_past] flat pool rows of the past tokens ``update`` returns


class _BlockTable:
    """Pages of one layer kind: an allocator, each sequence's logical -> physical block map, the device table."""

    def __init__(self, kind: str, num_blocks: int, block_size: int, window: int, max_seqs: int, width: int):
        self.kind, self.block_size, self.window, self.width = kind, block_size, window, width
        self.allocator = BlockAllocator(num_blocks)
        self.pages: list[dict[int, int]] = [{} for _ in range(max_seqs)]
        self.table: Tensor | None = None  # int32 [max_seqs, width], made on the cache's device

    def span(self, n: int, t: int) -> tuple[int, int]:
        """(keep_from, write_from) for a step from n to n + t tokens. Positions below keep_from are seen by no
        query of this step. Of the new tokens, those from write_from on are written: a sliding layer only keeps
        what the last query's window (``kv > q - window``) can see."""
        if not self.window:
            return 0, n
        return max(n - self.window + 1, 0), max(n, n + t - self.window)

    def plan(self, seq: int, n: int, t: int) -> tuple[list[int], list[int]]:
        """Logical blocks of ``seq`` to drop (out of the window) and to back with new pages."""
        bs, last = self.block_size, (n + t - 1) // self.block_size
        keep_from, write_from = self.span(n, t)
        pages = self.pages[seq]
        drop = [j for j in pages if j < keep_from // bs]
        grow = [j for j in range(write_from // bs, last + 1) if j not in pages]
        return drop, grow

    def check(self, plans: dict[int, tuple[list[int], list[int]]], lens: dict[int, int]) -> None:
        """Raise, naming the first sequence that cannot be served, before anything is changed. ``plans`` and
        ``lens`` (the length each sequence would reach) are keyed by sequence."""
        for seq, n in lens.items():
            if n > self.width * self.block_size:
                raise OutOfBlocksError(
                    f"sequence {seq} would hold {n} tokens but its block table has room for "
                    f"{self.width * self.block_size} (raise max_blocks_per_seq)",
                    seq,
                )
        left = self.allocator.num_free + sum(len(drop) for drop, _ in plans.values())
        for seq, (_, grow) in plans.items():
            if len(grow) > left:
                raise OutOfBlocksError(
                    f"sequence {seq} needs {len(grow)} more KV block(s) for its {self.kind} layers but only {left} "
                    f"of {self.allocator.num_blocks} are left (raise num_blocks or free finished sequences)",
                    seq,
                )
            left -= len(grow)

    def apply(self, plans: dict[int, tuple[list[int], list[int]]]) -> None:
        writes = []  # (row, column, block): one scatter into the device table
        for seq, (drop, grow) in plans.items():
            pages = self.pages[seq]
            self.allocator.free([pages.pop(j) for j in drop])
            for j, block in zip(grow, self.allocator.allocate(len(grow), seq)):
                pages[j] = block
            writes += [(seq, j, 0) for j in drop] + [(seq, j, pages[j]) for j in grow]
        if writes:
            rows, cols, vals = to_device(writes, self.table.device).T
            self.table.index_put_((rows, cols), vals.to(torch.int32))

    def row(self, seq: int, pos: int) -> int:
        """Flat pool row (``page * block_size + offset``) holding position ``pos`` of ``seq``."""
        return self.pages[seq][pos // self.block_size] * self.block_size + pos % self.block_size

    def step(self, n: int, rows: list[int], t: int) -> _Step:
        keep_from, write_from = self.span(n, t)
        table = self.table[torch.tensor(rows, device=self.table.device)].long()
        dev, bs = table.device, self.block_size

        def slots(lo: int, hi: int) -> Tensor:
            pos = torch.arange(lo, hi, device=dev)
            return table[:, pos // bs] * bs + pos % bs

        return _Step(slots(write_from, n + t).reshape(-1), n + t - write_from, slots(keep_from, n))

    def cut(self, seq: int, length: int) -> None:
        """Give back the pages of ``seq`` past its first ``length`` tokens; every page those tokens need must be
        there (a sliding layer that already dropped some cannot be cut back)."""
        pages, bs = self.pages[seq], self.block_size
        keep_from, _ = self.span(length, 0)
        missing = [j for j in range(keep_from // bs, (length - 1) // bs + 1) if j not in pages]
        if missing:
            raise ValueError(f"sequence {seq}: the {self.kind} pages of blocks {missing} were already dropped")
        tail = [j for j in pages if j > (length - 1) // bs]
        self.allocator.free([pages.pop(j) for j in tail])
        if tail:
            self.table[seq, to_device(tail, self.table.device)] = 0

    def release(self, seq: int) -> None:
        self.allocator.free(self.pages[seq].values())
        self.pages[seq].clear()
        if self.table is not None:
            self.table[seq].zero_()


class PagedLayer(CacheLayerMixin):
    """One decoder layer's pools; what it returns and what masks it asks for mirror the dynamic HF layers."""

    def __init__(self, pages: _BlockTable, device=None, dtype=None):
        super().__init__()
        self.pages = pages
        self.is_sliding = pages.window > 0
        self.sliding_window = pages.window
        self.device, self.dtype = device, dtype
        self.seen = 0  # tokens this layer has cached (per batch row, as in DynamicLayer)
        self.k_pool: Tensor | None = None
        self.v_pool: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Make the pools; kv heads and head_dim from the states, device and dtype from the cache or them."""
        self.device = self.device if self.device is not None else key_states.device
        self.dtype = self.dtype if self.dtype is not None else key_states.dtype
        shape = (self.pages.allocator.num_blocks, self.pages.block_size, key_states.shape[1])
        # zeros, not empty: pages never written must hold finite values for the masked gather of the reference
        self.k_pool = torch.zeros(*shape, key_states.shape[-1], device=self.device, dtype=self.dtype)
        self.v_pool = torch.zeros(*shape, value_states.shape[-1], device=self.device, dtype=self.dtype)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, step: _Step) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        return _write_and_gather(key_states, self.k_pool, step), _write_and_gather(value_states, self.v_pool, step)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.is_sliding:  # as DynamicSlidingWindowLayer: the last window - 1 past tokens, then the new ones
            return min(self.seen, self.sliding_window - 1) + query_length, max(self.seen - self.sliding_window + 1, 0)
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("PagedKVCache does not support beam search (reorder_cache)")


def write_rows(pool: Tensor, slots: Tensor, rows: Tensor) -> None:
    """Store ``rows`` ``[n, Hkv, D]`` at the flat pool rows ``slots`` ``[n]`` (``page * block_size + offset``).
    One ``index_put_`` on the pool itself (page, offset), as gpt-fast writes its cache: inductor re-inplaces it.
    Through a ``view`` of the pool, torch 2.11's inductor wrote a copy of the whole pool and copied it back."""
    block_size = pool.shape[1]
    pool[slots // block_size, slots % block_size] = rows.to(pool.dtype)


def gather_pages(pool: Tensor, block_tables: Tensor) -> Tensor:
    """``[B, Hkv, W * block_size, D]``: the pages of every block-table entry ``[B, W]``, in position order."""
    return pool[block_tables].flatten(1, 2).transpose(1, 2)


def length_mask(seq_lens: Tensor, positions: Tensor) -> Tensor:
    """``[B, 1, 1, K]`` bool: key position ``k`` is visible to the query at ``len - 1`` (``k < len``)."""
    return (positions < seq_lens[:, None])[:, None, None, :]


def window_mask(seq_lens: Tensor, positions: Tensor, window: int) -> Tensor:
    """``[B, 1, 1, K]`` bool: as ``length_mask``, and inside the sliding window (``k >= len - window``)."""
    lens = seq_lens[:, None]
    return ((positions < lens) & (positions >= lens - window))[:, None, None, :]


def _write_and_gather(states: Tensor, pool: Tensor, step: _Step) -> Tensor:
    """Write the step's new tokens into their pages; return past pages + new states as ``[B, Hkv, L, D]``."""
    b, h, t, d = states.shape
    write_rows(pool, step.write_slots, states[:, :, t - step.n_write:].transpose(1, 2).reshape(-1, h, d))
    past = pool.view(-1, h, d)[step.read_slots].transpose(1, 2).to(states.dtype)
    return torch.cat([past, states], dim=2)


class PagedKVCache(Cache):
    """A paged KV cache for ``CohereForCausalLM`` / ``Cohere2ForCausalLM`` (``generate(past_key_values=...)``).

    ``num_blocks`` pages of ``block_size`` tokens per full-attention layer; sliding layers get
    ``num_sliding_blocks`` (default: enough for ``max_seqs`` sequences' windows, at most ``num_blocks``).
    ``device`` / ``dtype`` default to those of the first ``update``. A ``generate`` call uses rows
    ``0 .. batch - 1`` (``select_rows`` picks others); call ``reset()`` before reusing the cache for new prompts.
    A ``DecodeRunner`` grows rows one by one (``grow``) and decodes through ``PagedDecodeView``.
    """

    def __init__(
        self,
        config,
        num_blocks: int,
        block_size: int = 16,
        device=None,
        dtype=None,
        *,
        max_seqs: int = 64,
        max_blocks_per_seq: int | None = None,
        num_sliding_blocks: int | None = None,
    ):
        text_config = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"PagedKVCache supports full and sliding attention layers, not {sorted(unknown)}")
        width = max_blocks_per_seq or cdiv(text_config.max_position_embeddings, block_size)
        window = layer_kwargs.get("sliding_window") or 0
        if num_sliding_blocks is None:  # a step holds at most the past window and a window of new tokens
            num_sliding_blocks = min(num_blocks, max_seqs * (cdiv(2 * window, block_size) + 2))
        self.block_size, self.max_seqs, self.width = block_size, max_seqs, width
        self._tables = {
            kind: _BlockTable(kind, num_sliding_blocks if kind == "sliding_attention" else num_blocks, block_size,
                              window if kind == "sliding_attention" else 0, max_seqs, width)
            for kind in dict.fromkeys(layer_types)
        }
        self._lens = [0] * max_seqs
        self._rows: list[int] | None = None  # cache rows of the batch rows (None: 0 .. batch - 1)
        self.seq_lens: Tensor | None = None  # int32 [max_seqs], made on the cache's device
        self._step_key: tuple[int, tuple[int, ...], int] | None = None
        self._steps: dict[str, _Step] = {}
        super().__init__(layers=[PagedLayer(self._tables[kind], device, dtype) for kind in layer_types])
        if device is not None:
            self._make_tables(device)
            if dtype is not None:
                head_dim = getattr(text_config, "head_dim", None) or (
                    text_config.hidden_size // text_config.num_attention_heads)
                self.early_initialization(0, text_config.num_key_value_heads, head_dim, dtype, device)

    def _make_tables(self, device) -> None:
        for pages in self._tables.values():
            pages.table = torch.zeros(self.max_seqs, pages.width, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(self.max_seqs, dtype=torch.int32, device=device)

    @property
    def page_tables(self) -> dict[str, "_BlockTable"]:
        """Layer kind -> its pages (allocator, host page maps, device block table)."""
        return self._tables

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, cache_kwargs=None, **kwargs):
        """Write the new K/V ``[B, Hkv, T, D]`` into the pages of rows ``0 .. B-1`` (or the selected rows);
        return the K/V attention needs, as the matching dynamic HF layer would."""
        layer = self.layers[layer_idx]
        if self.seq_lens is None:
            self._make_tables(layer.device or key_states.device)
        step = self._advance(layer.seen, key_states.shape[0], key_states.shape[-2])[layer.pages.kind]
        return layer.update(key_states, value_states, step)

    @torch.compiler.disable  # host-side bookkeeping (free lists, Python ints): run it, never trace it
    def _advance(self, n: int, batch: int, t: int) -> dict[str, _Step]:
        """The first layer to reach a new step grows every table (all or nothing); later layers reuse it."""
        rows = tuple(self._rows if self._rows is not None else range(batch))
        if self._step_key == (n, rows, t):
            return self._steps
        if batch > self.max_seqs or len(rows) != batch:
            raise ValueError(f"batch of {batch} sequences but the cache was made with max_seqs={self.max_seqs}"
                             if self._rows is None else f"batch of {batch} sequences but rows {list(rows)} selected")
        lens = [self._lens[r] for r in rows]
        if any(length != n for length in lens):
            raise RuntimeError(
                f"rows {list(rows)} of the cache hold {lens} tokens, the layer expects {n} each "
                "(call reset() before reusing the cache for new prompts)"
            )
        self.grow(list(rows), t)
        self._step_key = (n, rows, t)
        self._steps = {kind: pages.step(n, list(rows), t) for kind, pages in self._tables.items()}
        return self._steps

    def grow(self, rows: list[int], t: int) -> None:
        """Give each of ``rows`` pages for ``t`` more tokens (sliding layers drop what left their window), all or
        nothing: ``OutOfBlocksError`` naming the first row that cannot be served, before anything changes."""
        if len(set(rows)) != len(rows) or not all(0 <= r < self.max_seqs for r in rows):
            raise ValueError(f"rows {rows} must be distinct and in 0 .. {self.max_seqs - 1}")
        plans = {kind: {r: pages.plan(r, self._lens[r], t) for r in rows} for kind, pages in self._tables.items()}
        new_lens = {r: self._lens[r] + t for r in rows}
        for kind, pages in self._tables.items():
            pages.check(plans[kind], new_lens)
        for kind, pages in self._tables.items():
            pages.apply(plans[kind])
        for r in rows:
            self._lens[r] += t
        self.seq_lens[to_device(rows, self.seq_lens.device)] += t

    def truncate(self, row: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``row`` and give back the pages past them. Why: a right-padded
        batched prefill grows every row to the longest prompt; each row is then cut back to its own prompt (what
        the padding wrote past it is never read: reads stop at a row's length)."""
        if not 0 < length <= self._lens[row]:
            raise ValueError(f"row {row} holds {self._lens[row]} tokens: cannot keep {length}")
        for pages in self._tables.values():
            pages.cut(row, length)
        self._lens[row] = length
        self.seq_lens[row] = length
        self._step_key = None

    def length(self, row: int) -> int:
        """Tokens cached in ``row``."""
        return self._lens[row]

    @contextlib.contextmanager
    def select_rows(self, rows: list[int]):
        """Inside the block, batch row ``i`` of a forward pass is cache row ``rows[i]`` (they must hold equally
        many tokens): how a runner prefills one sequence into its own row through the eager path."""
        lens = {self._lens[r] for r in rows}
        if len(lens) != 1:
            raise ValueError(f"rows {rows} hold different lengths {[self._lens[r] for r in rows]}")
        saved = [layer.seen for layer in self.layers]
        self._rows, self._step_key = list(rows), None
        for layer in self.layers:
            layer.seen = self._lens[rows[0]]
        try:
            yield self
        finally:
            self._rows, self._step_key = None, None
            for layer, seen in zip(self.layers, saved):
                layer.seen = seen

    def paged_attention_inputs(self, layer_idx: int, batch_size: int | None = None):
        """``(k_pool, v_pool, block_tables, seq_lens, window)`` of a layer, as ``paged_attention`` takes them,
        for the first ``batch_size`` sequences (all ``max_seqs`` rows by default)."""
        layer = self.layers[layer_idx]
        rows = slice(0, batch_size)
        return layer.k_pool, layer.v_pool, layer.pages.table[rows], self.seq_lens[rows], layer.sliding_window

    def free_sequence(self, seq: int) -> None:
        """Give back every page of sequence ``seq`` (all layer kinds); its row reads as empty afterwards."""
        for pages in self._tables.values():
            pages.release(seq)
        self._lens[seq] = 0
        if self.seq_lens is not None:
            self.seq_lens[seq] = 0
        self._step_key = None

    def reset(self) -> None:
        """Free every sequence; pools stay allocated (and keep stale values, which no length covers)."""
        for seq in range(self.max_seqs):
            self.free_sequence(seq)
        for layer in self.layers:
            layer.seen = 0

    def num_free_blocks(self) -> dict[str, int]:
        return {kind: pages.allocator.num_free for kind, pages in self._tables.items()}


class PagedDecodeView:
    """The cache as one compiled decode step of ``batch`` rows sees it: static device buffers only.

    Why a view: the traced step must hold no host bookkeeping (that breaks graphs) and keep the same tensors from
    step to step (no recompiles, CUDA-graph replay). The runner grows the cache on the host, then ``copy_``s the
    step's block tables, lengths (including the new token) and write slots into these buffers. ``update`` writes
    the new token's K/V with an ``index_put_`` and returns the K/V gathered through the block table; the masks
    come from the lengths. Traced, that is the gather + mask + SDPA the ``paged_attention`` pattern replaces by
    the op reading the pools in place. Duck-typed as the one ``Cache`` method a decoder layer calls.
    """

    def __init__(self, cache: PagedKVCache, batch: int):
        device = cache.seq_lens.device
        self.kinds = [layer.pages.kind for layer in cache.layers]
        self.windows = {kind: pages.window for kind, pages in cache.page_tables.items()}
        self.k_pools = [layer.k_pool for layer in cache.layers]
        self.v_pools = [layer.v_pool for layer in cache.layers]
        self.block_tables = {kind: torch.zeros(batch, cache.width, dtype=torch.int32, device=device)
                             for kind in self.windows}
        self.write_slots = {kind: torch.zeros(batch, dtype=torch.int64, device=device) for kind in self.windows}
        self.seq_lens = torch.ones(batch, dtype=torch.int32, device=device)
        self.kv_len = cache.width * cache.block_size
        for t in (*self.k_pools, *self.v_pools, *self.block_tables.values(), *self.write_slots.values(),
                  self.seq_lens):
            torch._dynamo.mark_static_address(t)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, cache_kwargs=None, **kwargs):
        kind = self.kinds[layer_idx]
        k_pool, v_pool = self.k_pools[layer_idx], self.v_pools[layer_idx]
        write_rows(k_pool, self.write_slots[kind], key_states[:, :, -1])
        write_rows(v_pool, self.write_slots[kind], value_states[:, :, -1])
        table = self.block_tables[kind]
        return gather_pages(k_pool, table), gather_pages(v_pool, table)

    def attention_masks(self) -> dict[str, Tensor]:
        """Layer kind -> its ``[B, 1, 1, K]`` bool mask over the gathered positions."""
        positions = torch.arange(self.kv_len, device=self.seq_lens.device)
        return {kind: window_mask(self.seq_lens, positions, window) if window else
                length_mask(self.seq_lens, positions) for kind, window in self.windows.items()}
