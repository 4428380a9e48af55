"""Blocks for sequences: allocation with prefix reuse, growth one token at a time,
copy-on-write for forks, and release into the radix cache.

A block's reference count is the number of block tables that hold it, plus one while the
radix cache owns it. ``can_*`` never change state; ``allocate`` / ``may_append`` may evict
unlocked cached blocks to make room."""
from typing import NamedTuple, Optional

from .block_pool import BlockPool
from .radix_cache import RadixCache
from .sequence import Sequence


class CopyOp(NamedTuple):
    """Copy-on-write: the runner copies block ``src``'s KV into ``dst`` before writing."""
    src: int
    dst: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.cache: Optional[RadixCache] = RadixCache(self.pool) if prefix_cache else None

    # --- accounting -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_cached(self) -> int:
        return self.cache.num_blocks if self.cache else 0

    def num_available(self) -> int:
        """Free blocks plus cached blocks that could be evicted now."""
        return self.pool.num_free + (self.cache.evictable_blocks() if self.cache else 0)

    def slot_usage(self, seqs) -> dict:
        """KV slots the given sequences hold: allocated (whole blocks, a shared block once),
        used (filled by some holder) and wasted (the tail of partly filled blocks)."""
        fill: dict[int, int] = {}
        for seq in seqs:
            for i, b in enumerate(seq.block_table):
                fill[b] = max(fill.get(b, 0), min(self.block_size, len(seq) - i * self.block_size))
        used, allocated = sum(fill.values()), len(fill) * self.block_size
        return {"slots_allocated": allocated, "slots_used": used, "slots_wasted": allocated - used}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self, n: int) -> list[int]:
        if self.pool.num_free < n and self.cache:
            self.cache.evict(n - self.pool.num_free)
        assert self.pool.num_free >= n, f"need {n} blocks, {self.pool.num_free} free after eviction"
        return [self.pool.allocate() for _ in range(n)]

    # --- prompt ---------------------------------------------------------------------------
    def _match(self, seq: Sequence):
        if not self.cache or not seq.use_prefix_cache:
            return None
        # NOTE: at least one prompt token is always computed, so that the step has logits
        return self.cache.match_prefix(seq.token_ids[:len(seq) - 1])

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """Prompt tokens of ``seq`` the prefix cache holds now (whole blocks)."""
        m = self._match(seq)
        return m.num_tokens if m else 0

    def can_allocate(self, seq: Sequence) -> bool:
        m = self._match(seq)
        cached = len(m.blocks) if m else 0
        # matched blocks stop being evictable once their path is locked: those of its unlocked
        # nodes (a locked node's blocks are not counted as evictable in the first place)
        evictable_lost, node = 0, m.node if m else None
        while node is not None:
            evictable_lost += len(node.blocks) if node.lock_ref == 0 else 0
            node = node.parent
        return self.blocks_needed(len(seq)) - cached <= self.num_available() - evictable_lost

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, f"sequence {seq.seq_id} already has blocks"
        m = self._match(seq)
        if m and m.blocks:
            self.cache.lock(m.node)
            seq.cache_node = m.node
            for b in m.blocks:
                self.pool.incref(b)
            seq.block_table = list(m.blocks)
        seq.num_cached_tokens = seq.num_computed_tokens = m.num_tokens if m else 0
        seq.block_table += self._take(self.blocks_needed(len(seq)) - len(seq.block_table))

    # --- decode -----------------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """Room for every token of ``seq`` (call after appending): new blocks, plus a private
        copy of a shared last block that the next token would be written into."""
        need = self.blocks_needed(len(seq)) - len(seq.block_table)
        if seq.block_table and seq.num_computed_tokens % self.block_size and self.pool.ref[seq.block_table[-1]] > 1:
            need += 1
        return need <= self.num_available()

    def may_append(self, seq: Sequence) -> list[CopyOp]:
        """Makes the slots for ``len(seq)`` tokens writable; returns the KV copies that
        copy-on-write needs (the shared last block becomes a private copy)."""
        copies = []
        last = seq.block_table[-1] if seq.block_table else None
        partial = seq.num_computed_tokens % self.block_size
        if last is not None and partial and self.pool.ref[last] > 1:
            (new,) = self._take(1)
            copies.append(CopyOp(last, new))
            self.pool.decref(last)
            seq.block_table[-1] = new
        more = self.blocks_needed(len(seq)) - len(seq.block_table)
        if more > 0:
            seq.block_table += self._take(more)
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (n > 1 sampling of one prompt). The parent's
        computed full blocks enter the radix cache first, under the node both then lock: a block
        that sequences share is either there, locked, or the partly filled last one, which
        copy-on-write splits before either writes it. So an unlocked cached block has no holder
        but the cache, and ``RadixCache.evictable_blocks`` is what eviction can free."""
        assert not child.block_table
        self.cache_prefix(parent)
        for b in parent.block_table:
            self.pool.incref(b)
        child.block_table = list(parent.block_table)
        child.num_cached_tokens, child.num_computed_tokens = parent.num_cached_tokens, parent.num_computed_tokens
        if parent.cache_node is not None:
            self.cache.lock(parent.cache_node)
            child.cache_node = parent.cache_node

    def cache_prefix(self, seq: Sequence) -> None:
        """A running sequence's computed full blocks enter the radix cache now, not only when it
        finishes (SGLang's ``cache_unfinished_req``): requests admitted from the next step on
        share a prompt that is still being decoded. The sequence's lock moves to the deeper node."""
        if not self.cache:
            return
        n = seq.num_computed_tokens // self.block_size
        if n == 0:
            return
        tokens = seq.token_ids[:n * self.block_size]
        self.cache.insert(tokens, seq.block_table[:n])
        node = self.cache.match_prefix(tokens).node
        self.cache.lock(node)
        if seq.cache_node is not None:
            self.cache.unlock(seq.cache_node)
        seq.cache_node = node

    # --- release -----------------------------------------------------------------------------
    def deallocate(self, seq: Sequence, cache: bool = True) -> None:
        """Returns the sequence's blocks; with ``cache``, its computed full blocks enter the radix cache."""
        if self.cache and cache:
            n = seq.num_computed_tokens
            self.cache.insert(seq.token_ids[:n], seq.block_table[:n // self.block_size])
        if seq.cache_node is not None:
            self.cache.unlock(seq.cache_node)
            seq.cache_node = None
        for b in seq.block_table:
            self.pool.decref(b)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def slot(self, seq: Sequence, pos: int) -> int:
        """KV slot of token ``pos``: ``block * block_size + offset``."""
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
