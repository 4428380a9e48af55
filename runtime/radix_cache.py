"""Radix prefix cache over KV blocks: a token-prefix tree whose edges own whole blocks.

A finished request leaves its full blocks here; a new request whose prompt starts with the
same tokens reuses them instead of recomputing. Nodes matched by running requests are locked
(``lock_ref`` counts the requests below); unlocked leaves are evicted least recently used first
when the pool runs short. The cache holds one reference on every block it owns (``BlockPool``)."""
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
        return m.num_tokens

    def lock(self, node: Node) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            node = node.parent

    def evictable_blocks(self) -> int:
        return sum(len(n.blocks) for n in self._nodes() if n.lock_ref == 0)

    def evict(self, num_blocks: int) -> int:
        """Frees at least ``num_blocks`` blocks by dropping unlocked leaves, least recently
        used first (a parent left childless becomes a candidate). Returns blocks freed."""
        freed = 0
        while freed < num_blocks:
            leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
            if not leaves:
                break
            leaf = min(leaves, key=lambda n: n.last_access)
            del leaf.parent.children[tuple(leaf.tokens[:self.block_size])]
            for b in leaf.blocks:
                self.pool.decref(b)
            self.num_blocks -= len(leaf.blocks)
            freed += len(leaf.blocks)
        return freed

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
