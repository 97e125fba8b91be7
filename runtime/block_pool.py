"""The KV block pool: reference-counted blocks, prefix-cache lookup, O(1) LRU eviction.

    free queue (LRU first):  head <-> b7 <-> b2 <-> b9 <-> tail
    A block with ref_cnt 0 sits in the free queue; if it still holds a hashed full block it is
    also in `cached`, so a later request with the same prefix takes it back (touch) instead of
    recomputing it. Allocation pops from the head and evicts whatever hash the block had.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False, slots=True)
class KVBlock:
    """One physical block of the KV cache (the same index in every layer's tensor)."""

    block_id: int
    ref_cnt: int = 0
    """Running sequences using the block."""
    block_hash: bytes | None = None
    """Hash of the full block's tokens and its prefix, once full and cached."""
    prev: KVBlock | None = None
    next: KVBlock | None = None


class FreeBlockQueue:
    """Intrusive doubly linked list of free blocks: append, popleft and remove are O(1)."""

    def __init__(self, blocks: list[KVBlock]):
        self.head = KVBlock(-1)
        self.tail = KVBlock(-1)
        self.head.next, self.tail.prev = self.tail, self.head
        self.size = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self.size

    def append(self, b: KVBlock) -> None:
        last = self.tail.prev
        last.next, b.prev, b.next, self.tail.prev = b, last, self.tail, b
        self.size += 1

    def remove(self, b: KVBlock) -> None:
        b.prev.next, b.next.prev = b.next, b.prev
        b.prev = b.next = None
        self.size -= 1

    def popleft(self) -> KVBlock:
        if self.size == 0:
            raise IndexError("no free block")
        b = self.head.next
        self.remove(b)
        return b


class BlockPool:
    """All blocks of the cache, with reference counts and the prefix-cache index."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free = FreeBlockQueue(self.blocks)
        self.enable_caching = enable_caching
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        """Fraction of blocks held by running sequences."""
        return 1.0 - self.num_free / self.num_blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        """The cached block holding that hash, if any."""
        return self.cached.get(block_hash) if self.enable_caching else None

    def can_allocate(self, n: int) -> bool:
        """Whether n blocks are free (the check of the can_allocate/allocate pair)."""
        return n <= len(self.free)

    def allocate(self, n: int) -> list[KVBlock] | None:
        """n fresh blocks (ref_cnt 1), evicting least recently freed cached blocks; None when
        fewer than n are free (an expected outcome: the scheduler preempts or waits)."""
        if not self.can_allocate(n):
            return None
        out = []
        for _ in range(n):
            b = self.free.popleft()
            if b.block_hash is not None:
                if self.cached.get(b.block_hash) is b:
                    del self.cached[b.block_hash]
                b.block_hash = None
            b.ref_cnt = 1
            out.append(b)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks a new sequence reuses."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free.remove(b)
            b.ref_cnt += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop a reference on each block; blocks reaching 0 become free but stay cached.
        Freed in reverse so a sequence's tail (least likely shared) is evicted first."""
        for b in reversed(blocks):
            if b.ref_cnt <= 0:
                raise RuntimeError(f"block {b.block_id} released more often than taken")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self.free.append(b)

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Record a full block's hash so later sequences with the same prefix can reuse it."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block)

    def uncache(self, block: KVBlock) -> None:
        """Forget a block's hash (its contents were never computed after all)."""
        if block.block_hash is not None and self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = None
