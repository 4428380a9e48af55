"""Radix prefix cache over KV blocks: a token-prefix tree whose edges own whole blocks.

A finished request leaves its full blocks here; a new request whose prompt starts with the
same tokens reuses them instead of recomputing. Nodes matched by running requests are locked
(``lock_ref`` counts the requests below); unlocked leaves are evicted least recently used first
when the pool runs short. The cache holds one reference on every block it owns (``BlockPool``).

Neither the scheduler's room check nor eviction walks the tree: the count of evictable blocks
follows locks as they change, and eviction pops a heap of candidate leaves kept across calls.
An entry is pushed whenever a node may have become an unlocked leaf or was touched; entries
that went stale (the node was locked, touched again, gained a child or left the tree) are
skipped when popped, and the heap is rebuilt from the tree when stale ones outnumber nodes."""
import heapq
import itertools
from typing import NamedTuple, Optional

from .block_pool import BlockPool


class Node:
    __slots__ = ("tokens", "blocks", "children", "parent", "lock_ref", "last_access")

    def __init__(self, tokens: tuple = (), blocks: tuple = (), parent: Optional["Node"] = None):
        self.tokens, self.blocks, self.parent = tokens, blocks, parent
        self.children: dict[tuple, Node] = {}  # keyed by the child's first block of tokens
        self.lock_ref = 0
        self.last_access = 0


class MatchResult(NamedTuple):
    blocks: list[int]   # cached blocks covering the matched prefix, in order
    num_tokens: int     # len(blocks) * block_size
    node: Node          # deepest matched node: lock it while the blocks are in use


class RadixCache:
    def __init__(self, pool: BlockPool):
        self.pool, self.block_size = pool, pool.block_size
        self.root = Node()
        self.root.lock_ref = 1  # never evicted
        self._clock = itertools.count(1)
        self.num_blocks = 0  # blocks owned by the tree
        self.num_evictable = 0  # of those, blocks of unlocked nodes: kept as locks change, not counted per call
        self.num_nodes = 0
        self._leaves: list = []  # heap of (last_access, push number, node): eviction candidates, some stale
        self._pushes = itertools.count()

    def _candidate(self, node: Node) -> None:
        """``node`` may be an unlocked leaf now, or was touched: (re)enters the eviction heap."""
        if not node.children and node.lock_ref == 0 and node is not self.root:
            heapq.heappush(self._leaves, (node.last_access, next(self._pushes), node))
            if len(self._leaves) > 2 * self.num_nodes + 64:
                self._leaves = [(n.last_access, next(self._pushes), n) for n in self._nodes()
                                if not n.children and n.lock_ref == 0]
                heapq.heapify(self._leaves)

    def _lru_leaf(self) -> Optional[Node]:
        """The least recently used unlocked leaf, or None; drops stale heap entries on the way."""
        while self._leaves:
            t, _, n = self._leaves[0]
            if n.parent is not None and not n.children and n.lock_ref == 0 and n.last_access == t:
                return n
            heapq.heappop(self._leaves)
        return None

    def _key(self, tokens, i: int) -> tuple:
        return tuple(tokens[i:i + self.block_size])

    def match_prefix(self, tokens) -> MatchResult:
        """Longest cached prefix of ``tokens`` in whole blocks; touches the matched path (LRU)."""
        bs, node, blocks, i = self.block_size, self.root, [], 0
        now = next(self._clock)
        while len(tokens) - i >= bs:
            child = node.children.get(self._key(tokens, i))
            if child is None:
                break
            n = 0  # whole blocks of the edge that match
            while n < len(child.blocks) and len(tokens) - i - n * bs >= bs and \
                    tuple(child.tokens[n * bs:(n + 1) * bs]) == self._key(tokens, i + n * bs):
                n += 1
            if n < len(child.blocks):
                child = self._split(child, n)
            child.last_access = now
            self._candidate(child)
            blocks.extend(child.blocks)
            i += n * bs
            node = child
        return MatchResult(blocks, i, node)

    def _split(self, node: Node, n: int) -> Node:
        """Splits ``node``'s edge after ``n`` blocks; returns the new upper node."""
        bs = self.block_size
        upper = Node(node.tokens[:n * bs], node.blocks[:n], node.parent)
        upper.lock_ref, upper.last_access = node.lock_ref, node.last_access
        node.parent.children[tuple(node.tokens[:bs])] = upper
        node.tokens, node.blocks, node.parent = node.tokens[n * bs:], node.blocks[n:], upper
        upper.children[tuple(node.tokens[:bs])] = node
        self.num_nodes += 1
        return upper

    def insert(self, tokens, blocks: list[int]) -> int:
        """Caches the full blocks of ``tokens`` (``blocks[i]`` holds tokens ``i*bs:(i+1)*bs``).
        Blocks whose prefix is already cached are left to the caller; the cache takes a
        reference on each block it adopts. Returns the number of tokens already cached."""
        bs = self.block_size
        n_full = min(len(tokens) // bs, len(blocks))
        tokens = tuple(tokens[:n_full * bs])
        m = self.match_prefix(tokens)
        rest = tuple(blocks[len(m.blocks):n_full])
        if rest:
            child = Node(tokens[m.num_tokens:], rest, m.node)
            child.last_access = next(self._clock)
            m.node.children[tokens[m.num_tokens:m.num_tokens + bs]] = child
            for b in rest:
                self.pool.incref(b)
            self.num_blocks += len(rest)
            self.num_evictable += len(rest)
            self.num_nodes += 1
            self._candidate(child)
        return m.num_tokens

    def lock(self, node: Node) -> None:
        while node is not None:
            if node.lock_ref == 0:
                self.num_evictable -= len(node.blocks)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.num_evictable += len(node.blocks)
                self._candidate(node)
            node = node.parent

    def evictable_blocks(self) -> int:
        """Blocks that eviction could free now (those of unlocked nodes); O(1), asked every step."""
        return self.num_evictable

    def evict(self, num_blocks: int) -> int:
        """Frees at least ``num_blocks`` blocks by dropping unlocked leaves, least recently
        used first (a parent left childless becomes a candidate). Returns blocks freed."""
        freed = 0
        while freed < num_blocks:
            leaf = self._lru_leaf()
            if leaf is None:
                break
            heapq.heappop(self._leaves)
            parent, leaf.parent = leaf.parent, None  # out of the tree: its heap entries are stale
            del parent.children[tuple(leaf.tokens[:self.block_size])]
            for b in leaf.blocks:
                self.pool.decref(b)
            self.num_blocks -= len(leaf.blocks)
            self.num_evictable -= len(leaf.blocks)
            self.num_nodes -= 1
            freed += len(leaf.blocks)
            self._candidate(parent)
        return freed

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
