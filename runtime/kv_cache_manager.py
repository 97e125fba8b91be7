"""Per-request block tables over the block pool, with prefix caching.

Block i of a request holds tokens [i*BS, (i+1)*BS). A full block's hash chains its parent's:
hash(parent_hash, its token ids, the request's cache key), so equal hashes mean equal whole
prefixes. The hash is a keyed 128-bit BLAKE2b under a random per-manager salt: a request whose
tokens were chosen to collide with another's prefix cannot read that request's KV blocks (a
64-bit Python hash can be attacked so; vLLM moved to a cryptographic one after such a report).

Sliding windows. When every layer attends within a window of W tokens (the plan's
`attention_window`), the query at position p reads keys p-W+1 .. p only, so before a step
computes tokens from position c on, the blocks wholly before c-W+1 are released (they stay
hashed in the pool's prefix cache until evicted). Their table entries become `hole`, a
placeholder, so entry j still covers positions j*BS ..; attention never reads them.

    W = 6, BS = 4, next position c = 13:   keys 8.. needed
    table  [ hole  hole  b9  b3 ]          a sequence holds about W/BS + 1 blocks
"""

from __future__ import annotations

import hashlib
import os
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from kiln.runtime.block_pool import BlockPool, KVBlock
from kiln.runtime.request import Request


class BlockHasher:
    """Hashes full blocks: a keyed 128-bit BLAKE2b of (parent hash, cache key, token ids)."""

    def __init__(self, salt: bytes | None = None):
        self.salt = salt if salt is not None else os.urandom(16)
        """The secret key (random per manager: collisions cannot be precomputed)."""
        self._base = hashlib.blake2b(digest_size=16, key=self.salt)

    def __call__(self, parent: bytes | None, tokens: Sequence[int], key: object) -> bytes:
        """Hash of one full block given its parent's hash; key: what else decides its content
        (the request's adapter and rope regime)."""
        h = self._base.copy()
        h.update(parent or bytes(16))
        h.update(repr(key).encode())
        h.update(array("q", tokens).tobytes())
        return h.digest()


@dataclass
class PrefixStats:
    """Prefix-cache counters, in tokens."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    """Which blocks each request holds; can_*/allocate pairs return False when blocks run out."""

    def __init__(self, pool: BlockPool, block_size: int, window: int | None = None):
        if window is not None and window < 1:
            raise ValueError(f"window must be None or >= 1, got {window}")
        self.pool = pool
        self.block_size = block_size
        self.window = window
        """The model's widest attention window in tokens (None: some layer attends globally)."""
        self.hole = KVBlock(0)
        """The placeholder for a released out-of-window entry (block id 0, never read)."""
        self.tables: dict[str, list[KVBlock]] = {}
        self.hashes: dict[str, list[bytes]] = {}
        self.block_hash = BlockHasher()
        self.cached_upto: dict[str, int] = {}
        """Per request, how many of its leading full blocks are registered in the cache."""
        self.stats = PrefixStats()

    def _full_hashes(self, req: Request, num_tokens: int) -> list[bytes]:
        hashes = self.hashes.setdefault(req.request_id, [])
        tokens = req.all_token_ids  # the live list: only the new blocks' tokens are read
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(self.block_hash(parent, tokens[i * bs : (i + 1) * bs], req.cache_key))
        return hashes

    def _first_needed(self, pos: int) -> int:
        """The first block that a query at position `pos` (or later) can read."""
        return max(pos - self.window + 1, 0) // self.block_size if self.window else 0

    def computed_prefix(self, req: Request) -> list[KVBlock]:
        """The cached blocks that hold a prefix of a waiting request's tokens. At least one
        token is always left to compute, so the step produces the next token's logits. With a
        window, only the blocks the first computed token can read must be cached: the longest
        such prefix is taken, with `hole` for the blocks before them."""
        if not self.pool.enable_caching:
            return []
        found = [self.pool.lookup(h) for h in self._full_hashes(req, req.num_tokens - 1)]
        k, missing = 0, -1  # the longest valid prefix so far; the last block not cached
        for i, b in enumerate(found):
            if b is None:
                if not self.window:
                    break
                missing = i
            elif missing < self._first_needed((i + 1) * self.block_size):
                k = i + 1
        lo = self._first_needed(k * self.block_size)
        return [self.hole] * lo + found[lo:k]

    def _release_out_of_window(self, table: list[KVBlock], pos: int) -> None:
        """Release the blocks no query from position `pos` on can read (see the module doc)."""
        end = min(self._first_needed(pos), len(table))
        start = end
        while start > 0 and table[start - 1] is not self.hole:  # holes are always a leading run
            start -= 1
        if start < end:
            self.pool.release(table[start:end])
            table[start:end] = [self.hole] * (end - start)

    def _holds(self, req: Request, total: int) -> bool:
        """Whether the request's blocks hold its first `total` tokens and every block they fill
        is already registered in the prefix cache (allocating for them changes nothing)."""
        table = self.tables.get(req.request_id)
        return bool(table) and total <= len(table) * self.block_size and (
            not self.pool.enable_caching or total // self.block_size <= self.cached_upto.get(req.request_id, 0))

    def has_room_for_one(self, reqs: list[Request]) -> list[bool]:
        """Per running request, whether allocate(req, 1) would change nothing (its next token
        goes into a block it holds): the scheduler checks every decode at once."""
        return [self._holds(req, req.num_computed_tokens + 1) for req in reqs]

    def allocate(self, req: Request, num_new_tokens: int, prefix: list[KVBlock] = ()) -> bool:
        """Blocks for the request's next num_new_tokens tokens (after its computed ones and
        any reused prefix); False, changing nothing, when the pool cannot provide them."""
        if not prefix and self._holds(req, req.num_computed_tokens + num_new_tokens):
            return True  # the common decode
        table = self.tables.setdefault(req.request_id, [])
        if self.window:  # always valid, even if this allocation fails: nothing reads them again
            self._release_out_of_window(table, req.num_computed_tokens)
        total = req.num_computed_tokens + len(prefix) * self.block_size + num_new_tokens
        need = -(-total // self.block_size) - len(table) - len(prefix)
        # Cached blocks with no reference are taken out of the free queue.
        reclaimed = sum(1 for b in prefix if b.ref_cnt == 0 and b is not self.hole)
        if not self.pool.can_allocate(max(need, 0) + reclaimed):
            if not table:
                del self.tables[req.request_id]
            return False
        if not table:  # admission: count the prompt against the prefix cache once
            self.stats.queries += req.num_tokens
            self.stats.hits += len(prefix) * self.block_size
        self.pool.touch([b for b in prefix if b is not self.hole])
        table.extend(prefix)
        if need > 0:
            table.extend(self.pool.allocate(need))
        if self.pool.enable_caching:
            # Full blocks get their hash now: their tokens are written this step. A token still
            # on the device (async scheduling) is unknown: its block is hashed by a later call.
            known = min(total, req.num_known_tokens)
            hashes = self._full_hashes(req, known)
            for i in range(self.cached_upto.get(req.request_id, 0), known // self.block_size):
                if table[i] is not self.hole:
                    self.pool.cache(table[i], hashes[i])
            self.cached_upto[req.request_id] = max(self.cached_upto.get(req.request_id, 0), known // self.block_size)
        return True

    def forget_uncomputed(self, req: Request) -> None:
        """Un-hash the blocks registered for tokens a failed step never computed, so no later
        prompt reuses garbage as a cached prefix."""
        first = req.num_computed_tokens // self.block_size
        for b in self.tables.get(req.request_id, [])[first:]:
            if b is not self.hole:
                self.pool.uncache(b)
        self.cached_upto[req.request_id] = min(self.cached_upto.get(req.request_id, 0), first)

    def free(self, req: Request) -> None:
        """Return every block of a finished, aborted or preempted request."""
        self.pool.release([b for b in self.tables.pop(req.request_id, []) if b is not self.hole])
        self.hashes.pop(req.request_id, None)
        self.cached_upto.pop(req.request_id, None)

    def table(self, req: Request) -> list[KVBlock]:
        """The request's blocks in order (the live list: read it, never change it)."""
        return self.tables.get(req.request_id, [])

    def block_ids(self, req: Request) -> list[int]:
        """A copy of the request's block ids (for tests and debugging; the model runner reads
        only newly allocated blocks through `table`)."""
        return [b.block_id for b in self.table(req)]

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def num_held(self, req: Request) -> int:
        """Blocks the request holds (its table less the released out-of-window entries)."""
        return sum(1 for b in self.table(req) if b is not self.hole)

    def peak_blocks(self, num_tokens: int) -> int:
        """The most blocks a sequence of num_tokens tokens holds at once, decoding: all of
        them, or with a window the W tokens a query reads, spread over at most W/BS + 1."""
        whole = self.num_blocks_for(num_tokens)
        return min(whole, self.num_blocks_for(self.window) + 1) if self.window else whole

    @property
    def max_seq_tokens(self) -> int:
        """The most tokens one sequence can ever reach: what the whole pool holds, or no limit
        (sys.maxsize) with a window whose blocks fit in it."""
        if self.peak_blocks(sys.maxsize) <= self.pool.num_blocks:
            return sys.maxsize
        return self.pool.num_blocks * self.block_size

    @property
    def max_chunk(self) -> int | None:
        """The most new tokens one step may give a request so that its blocks (the window
        behind the chunk and the chunk) fit in the whole pool; None without a window."""
        if not self.window:
            return None
        return max((self.pool.num_blocks - 1) * self.block_size - self.window + 1, 1)
