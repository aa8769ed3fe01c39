"""A free list of KV-cache blocks.

Why its own class: the paged cache (and a batching engine on top of it) must never hand one block to two
sequences and never lose one. Keeping that bookkeeping in one small object makes it checkable on its own, and
every call either succeeds completely or changes nothing, so a failed request leaves the others intact.
"""


class OutOfBlocksError(RuntimeError):
    """A sequence needs more KV blocks than the cache can give it; ``seq`` names that sequence."""

    def __init__(self, message: str, seq: int | None = None):
        super().__init__(message)
        self.seq = seq


class BlockAllocator:
    """Hands out block ids ``0 .. num_blocks - 1``; lowest ids first, freed ids are reused first."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.reset()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_allocated(self, block: int) -> bool:
        return block in self._used

    def allocate(self, n: int, seq: int | None = None) -> list[int]:
        """``n`` distinct free blocks; ``seq`` only names the requester in the error when there are too few."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            who = f"sequence {seq}" if seq is not None else "allocation"
            raise OutOfBlocksError(
                f"{who} needs {n} KV block(s) but only {len(self._free)} of {self.num_blocks} are free "
                "(raise num_blocks or free finished sequences)",
                seq,
            )
        blocks = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        self._used.update(blocks)
        return blocks

    def free(self, blocks) -> None:
        """Return ``blocks`` to the free list; a block that is not allocated (or is listed twice) is an error."""
        blocks = list(blocks)
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"block listed twice in free({blocks})")
        stray = [b for b in blocks if b not in self._used]
        if stray:
            raise ValueError(f"freeing block(s) {stray} that are not allocated")
        self._used.difference_update(blocks)
        self._free.extend(reversed(blocks))

    def reset(self) -> None:
        """Everything free again."""
        self._free = list(range(self.num_blocks - 1, -1, -1))  # a stack: the end is handed out first
        self._used: set[int] = set()
