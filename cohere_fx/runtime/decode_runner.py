"""``DecodeRunner``: one model, one paged KV cache, prompts prefilled into slots, slots decoded together.

Why this shape: decode is one token per sequence, so its cost is reading the weights and the cache once per
step; anything on the host per layer (Python, allocator calls, kernel launches) shows up directly. So:
- the host bookkeeping (pages, lengths) runs once per step, outside the compiled function, and ends in a few
  ``copy_`` into static buffers (``PagedDecodeView``);
- the step itself (embedding .. logits) is one Dynamo graph per batch bucket, compiled with the ``cohere_fx``
  backend, whose ``paged_attention`` pattern reads the pages in place;
- on CUDA each bucket is captured once as a CUDA graph and replayed: no Python per layer per step.
Prefill runs eagerly with SDPA through the cache's generate path (``select_rows``): the full-attention layers take
SDPA's causal flash kernel, and prompts of every length run without a compile each (a compiled prefill would
recompile per length or lose the static-shape mask proofs the attention patterns need).

The protocol (shared with the engine): slots are cache rows ``0 .. max_batch - 1``; ``prefill`` and ``decode``
return fp32 logits; running out of pages raises ``OutOfBlocksError`` naming the slot before anything changes.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from cohere_fx.runtime.paged_cache import PagedDecodeView, PagedKVCache, cdiv, to_device


def decode_step(model, view: PagedDecodeView, input_ids: Tensor, position_ids: Tensor) -> Tensor:
    """One token per row: ``[B, 1]`` ids at ``[B, 1]`` positions -> fp32 logits ``[B, V]`` (the traced step)."""
    masks = view.attention_masks()
    mask = masks if "sliding_attention" in masks else masks["full_attention"]  # Cohere2 takes a dict per kind
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, past_key_values=view,
                use_cache=True)
    return out.logits[:, -1].float()


@dataclass
class _Bucket:
    """Static inputs and output of the decode step at one batch size (and its CUDA graph)."""

    view: PagedDecodeView
    input_ids: Tensor
    position_ids: Tensor
    logits: Tensor | None = None
    graph: "torch.cuda.CUDAGraph | None" = None


class DecodeRunner:
    """Prefill prompts into slots and decode any set of slots one token at a time (see the module docstring).

    ``num_blocks`` pages per full-attention layer (default: ``max_batch`` sequences of ``max_seq_len``); sliding
    layers get enough pages for ``max_batch`` windows. ``options`` are the ``cohere_fx`` backend's.
    ``max_prefill_tokens``: padded tokens per prefill forward (``prefill_batch``), which bounds its activations.
    """

    def __init__(self, model, *, max_batch: int = 16, max_seq_len: int = 4096, block_size: int = 16,
                 num_blocks: int | None = None, compile: bool = True, cuda_graphs: bool | None = None,
                 buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), options: dict | None = None,
                 max_prefill_tokens: int = 16384):
        config = model.config.get_text_config(decoder=True)
        if config._attn_implementation != "sdpa":
            raise ValueError(f"DecodeRunner needs attn_implementation='sdpa', the model has "
                             f"{config._attn_implementation!r}")
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch ({max_batch}) and max_seq_len ({max_seq_len}) must be >= 1")
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.max_batch, self.max_seq_len, self.vocab_size = max_batch, max_seq_len, config.vocab_size
        width = cdiv(max_seq_len, block_size)
        num_blocks = max_batch * width if num_blocks is None else num_blocks
        window = getattr(config, "sliding_window", None) or 0
        self.window, self.max_prefill_tokens = window, max_prefill_tokens
        sliding_blocks = min(num_blocks, max_batch * (cdiv(window, block_size) + 1))
        # one page more per kind: page 0, the scratch page that pad rows write and unused table entries name
        self.cache = PagedKVCache(model.config, num_blocks + 1, block_size, self.device, param.dtype,
                                  max_seqs=max_batch, max_blocks_per_seq=width, num_sliding_blocks=sliding_blocks + 1)
        for pages in self.cache.page_tables.values():
            if pages.allocator.allocate(1) != [0]:
                raise RuntimeError("the scratch page must be page 0")
        self.buckets = tuple(sorted({b for b in buckets if b < max_batch} | {max_batch}))
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self._step = (torch.compile(decode_step, backend="cohere_fx", options=options, fullgraph=True, dynamic=False)
                      if compile else decode_step)
        self._buckets: dict[int, _Bucket] = {}

    # -- bookkeeping -------------------------------------------------------------------------------------------

    def length(self, slot: int) -> int:
        return self.cache.length(self._check_slot(slot))

    # Pages are counted in the pool that binds: the full-attention layers'. The sliding layers' pool holds a
    # window's pages for every slot (see __init__), so it cannot run out first; counting it too (the fewest
    # free, the most needed) would hold requests back that fit, and refuse long ones outright.

    def _binding_pages(self):
        tables = self.cache.page_tables
        return tables.get("full_attention") or next(iter(tables.values()))

    def blocks_needed(self, slot: int, new_tokens: int) -> int:
        slot = self._check_slot(slot)
        return len(self._binding_pages().plan(slot, self.cache.length(slot), new_tokens)[1])

    def free_blocks(self) -> int:
        return self._binding_pages().allocator.num_free

    def free(self, slot: int) -> None:
        self.cache.free_sequence(self._check_slot(slot))

    def warmup(self, sizes: tuple[int, ...] | None = None) -> None:
        """Compile (and on CUDA capture) the decode step for these batch buckets now (default: all), so no
        request pays for it later. Only the scratch page is written."""
        for size in self.buckets if sizes is None else sizes:
            if size not in self.buckets:
                raise ValueError(f"{size} is not one of the buckets {self.buckets}")
            if size not in self._buckets:
                bucket = self._bucket(size)
                if bucket.graph is None:
                    with torch.no_grad():
                        self._run(bucket)  # a fresh bucket's buffers are all pad rows

    def _check_slot(self, slot: int) -> int:
        if not (isinstance(slot, int) and 0 <= slot < self.max_batch):
            raise ValueError(f"slot {slot!r} is not in 0 .. {self.max_batch - 1}")
        return slot

    # -- prefill -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, slot: int, prompt: torch.LongTensor) -> Tensor:
        """Prompt ``[T]`` into the empty ``slot``; fp32 logits ``[V]`` of its last position."""
        return self.prefill_batch([slot], [prompt])[0]

    @torch.no_grad()
    def prefill_batch(self, slots: list[int], prompts: list[torch.LongTensor]) -> Tensor:
        """Prompts into their empty slots, as few forwards as possible; fp32 logits ``[B, V]`` of each prompt's
        last position, in the order given.

        Why batched: one forward over B prompts reads the weights once, B forwards read them B times (16 prompts
        of 512 tokens on Command-R7B: one forward instead of 16). Prompts of different lengths are right-padded
        to the longest of their group: causal attention keeps the pad tokens out of every real token's view, and
        each row is cut back to its own length afterwards. A group holds at most ``max_prefill_tokens`` padded
        tokens, prompts sorted by length so the padding stays small; on a model with sliding-window layers a
        group longer than the window holds prompts of one length only (a sliding layer keeps only the last
        window of a row, which for a shorter prompt would be pad tokens)."""
        slots = [self._check_slot(s) for s in slots]
        if len(slots) != len(prompts) or len(set(slots)) != len(slots):
            raise ValueError(f"prefill_batch takes distinct slots and one prompt per slot, got slots {slots} "
                             f"and {len(prompts)} prompts")
        for slot, prompt in zip(slots, prompts):
            if prompt.dim() != 1 or prompt.numel() < 1:
                raise ValueError(f"prompt for slot {slot} must be a non-empty 1-D tensor of token ids, got shape "
                                 f"{tuple(prompt.shape)}")
            if prompt.numel() > self.max_seq_len:
                raise ValueError(f"prompt of {prompt.numel()} tokens for slot {slot} is longer than "
                                 f"max_seq_len={self.max_seq_len}")
            if self.cache.length(slot):
                raise ValueError(f"slot {slot} is not empty (free it first)")
        logits = [None] * len(slots)
        for group in self._prefill_groups([p.numel() for p in prompts]):
            rows = self._prefill_group([slots[i] for i in group], [prompts[i] for i in group])
            for i, row in zip(group, rows):
                logits[i] = row
        return torch.stack(logits)

    def _prefill_groups(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the prompts that share a forward (see ``prefill_batch``). A padded group must also fit the
        free pages beside what the groups before it keep, since every row holds the longest prompt's pages until
        it is cut back."""
        groups, group, kept, pages = [], [], 0, self.cache.block_size
        for i in sorted(range(len(lengths)), key=lengths.__getitem__):
            longest = lengths[i]  # sorted: the newest member is the longest
            fits = (len(group) + 1) * longest <= self.max_prefill_tokens
            window_ok = not self.window or longest <= self.window or all(lengths[j] == longest for j in group)
            pages_ok = kept + (len(group) + 1) * cdiv(longest, pages) <= self.free_blocks()
            if group and not (fits and window_ok and pages_ok):
                groups.append(group)
                kept += sum(cdiv(lengths[j], pages) for j in group)
                group = []
            group.append(i)
        return groups + [group] if group else groups

    def _prefill_group(self, slots: list[int], prompts: list[Tensor]) -> Tensor:
        lengths = [p.numel() for p in prompts]
        longest = max(lengths)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            ids[row, :prompt.numel()] = prompt.to(self.device)
        last = sorted({n - 1 for n in lengths})  # the head runs on these positions only
        try:  # the first layer grows every slot's pages, all or nothing (OutOfBlocksError names the slot)
            with self.cache.select_rows(slots):
                out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                                 logits_to_keep=torch.tensor(last, device=self.device))
            for slot, n in zip(slots, lengths):
                if n < longest:
                    self.cache.truncate(slot, n)
        except BaseException:
            for slot in slots:  # nothing to free after OutOfBlocksError; half-written prompts else
                self.cache.free_sequence(slot)
            raise
        rows = torch.arange(len(prompts), device=self.device)
        return out.logits[rows, torch.tensor([last.index(n - 1) for n in lengths], device=self.device)].float()

    # -- decode ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, slots: list[int], tokens: torch.LongTensor) -> Tensor:
        """Append ``tokens[i]`` to ``slots[i]``; fp32 logits ``[B, V]`` of each slot's next token."""
        slots = [self._check_slot(s) for s in slots]
        batch = len(slots)
        if tokens.dim() != 1 or tokens.numel() != batch or not 1 <= batch <= self.max_batch:
            raise ValueError(f"decode takes 1 .. {self.max_batch} slots and one token per slot, got {batch} slots "
                             f"and tokens of shape {tuple(tokens.shape)}")
        if len(set(slots)) != batch:
            raise ValueError(f"slots {slots} are not distinct")
        for s in slots:
            n = self.cache.length(s)
            if n == 0:
                raise ValueError(f"slot {s} is empty (prefill it first)")
            if n + 1 > self.max_seq_len:
                raise ValueError(f"slot {s} holds {n} tokens: one more exceeds max_seq_len={self.max_seq_len}")
        self.cache.grow(slots, 1)  # all or nothing: OutOfBlocksError names the slot, nothing changed
        bucket = self._bucket(next(b for b in self.buckets if b >= batch))
        self._fill(bucket, slots, tokens)
        if bucket.graph is not None:
            bucket.graph.replay()
            return bucket.logits[:batch].clone()
        return self._run(bucket)[:batch]

    def _fill(self, bucket: _Bucket, slots: list[int], tokens: Tensor) -> None:
        """Copy this step's inputs into the bucket's static buffers (one host-to-device copy, a few device
        copies). Rows past the batch are pad rows: position 0, length 1, every page the scratch page 0."""
        view, batch = bucket.view, len(slots)
        kinds = list(view.block_tables)
        positions = [self.cache.length(s) - 1 for s in slots]
        pad = [0] * (bucket.input_ids.shape[0] - batch)
        dev = to_device([positions + pad, [n + 1 for n in positions] + [1] * len(pad), slots + pad]
                        + [[self.cache.page_tables[k].row(s, n) for s, n in zip(slots, positions)] + pad
                           for k in kinds], self.device)
        bucket.input_ids[:batch, 0].copy_(tokens)
        bucket.position_ids.copy_(dev[0, :, None])
        view.seq_lens.copy_(dev[1])
        for i, kind in enumerate(kinds):
            view.write_slots[kind].copy_(dev[3 + i])
            torch.index_select(self.cache.page_tables[kind].table, 0, dev[2, :batch],
                               out=view.block_tables[kind][:batch])
            view.block_tables[kind][batch:] = 0

    def _run(self, bucket: _Bucket) -> Tensor:
        return self._step(self.model, bucket.view, bucket.input_ids, bucket.position_ids)

    def _bucket(self, size: int) -> _Bucket:
        if size in self._buckets:
            return self._buckets[size]
        ids = torch.zeros(size, 1, dtype=torch.long, device=self.device)
        bucket = _Bucket(PagedDecodeView(self.cache, size), ids, torch.zeros_like(ids))
        torch._dynamo.mark_static_address(bucket.input_ids)
        torch._dynamo.mark_static_address(bucket.position_ids)
        if self.cuda_graphs:
            self._capture(bucket)
        self._buckets[size] = bucket
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        """Warm up (compile, autotune) and capture the step with every row a pad row: only the scratch page is
        written; replays then read whatever ``_fill`` put in the buffers."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        bucket.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bucket.graph):
            bucket.logits = self._run(bucket)


__all__ = ["DecodeRunner", "decode_step"]
