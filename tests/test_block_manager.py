"""Block manager + radix cache: exact block ids for the simple cases, LRU eviction order, and a
stateful model check: every block is free xor referenced, ref counts equal their holders, an
idle pool is total minus cached, and every sequence reads back exactly the tokens it wrote
(prefix reuse and copy-on-write included), modelled with a fake KV store. Last, a step's
packed inputs against a token-by-token reference."""
import torch
from hypothesis import given, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qcompiler.runtime.block_manager import BlockManager
from qcompiler.runtime.block_pool import BlockPool
from qcompiler.runtime.radix_cache import RadixCache
from qcompiler.runtime.sequence import Sequence
from qcompiler.runtime.step_inputs import step_inputs


def test_allocate_append_deallocate_exact_ids():
    bm = BlockManager(num_blocks=8, block_size=4, prefix_cache=False)
    s = Sequence(list(range(6)))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert s.block_table == [0, 1] and bm.num_free == 6
    s.num_computed_tokens = 6
    for t in (6, 7):
        s.token_ids.append(t)
        assert bm.can_append(s) and bm.may_append(s) == []
        s.num_computed_tokens += 1
    assert s.block_table == [0, 1]
    s.token_ids.append(8)
    bm.may_append(s)
    assert s.block_table == [0, 1, 2] and bm.slot(s, 8) == 8
    bm.deallocate(s)
    assert bm.num_free == 8 and list(bm.pool.free) == [3, 4, 5, 6, 7, 0, 1, 2]


def test_slot_usage_counts_shared_blocks_once():
    bm = BlockManager(num_blocks=16, block_size=4, prefix_cache=False)
    a, b = Sequence(list(range(5))), Sequence(list(range(9)))
    bm.allocate(a)
    bm.allocate(b)
    assert bm.slot_usage([a, b]) == {"slots_allocated": 20, "slots_used": 14, "slots_wasted": 6}
    c = Sequence(list(a.token_ids))
    bm.fork(a, c)  # shares a's two blocks: nothing new allocated or used
    assert bm.slot_usage([a, b, c]) == {"slots_allocated": 20, "slots_used": 14, "slots_wasted": 6}


def test_prefix_reuse_and_cached_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence(list(range(10)))
    bm.allocate(a)
    a.num_computed_tokens = 10
    bm.deallocate(a)                       # blocks 0, 1 (tokens 0..7) cached, block 2 freed
    assert bm.num_cached == 2 and bm.num_free == 6
    b = Sequence(list(range(9)) + [99])    # shares 9 tokens: 2 whole blocks
    bm.allocate(b)
    assert b.block_table[:2] == [0, 1] and b.num_cached_tokens == 8
    c = Sequence(list(range(8)))           # the whole prompt is cached: still computes its last token
    bm.allocate(c)
    assert c.num_cached_tokens == 4 and c.block_table[0] == 0 and c.block_table[1] != 1


def test_lru_eviction_order():
    pool = BlockPool(8, 2)
    cache = RadixCache(pool)
    blocks = {}
    for name, toks in (("a", [1, 1]), ("b", [2, 2]), ("c", [3, 3])):
        blocks[name] = pool.allocate()
        cache.insert(toks, [blocks[name]])
        pool.decref(blocks[name])          # the cache is now the only holder
    cache.match_prefix([1, 1])             # touch a: b is now the least recently used
    assert cache.evict(1) == 1 and pool.ref[blocks["b"]] == 0 and list(pool.free)[-1] == blocks["b"]
    assert cache.evict(1) == 1 and pool.ref[blocks["c"]] == 0
    m = cache.match_prefix([1, 1, 5])
    cache.lock(m.node)
    assert cache.evict(1) == 0             # a is locked
    cache.unlock(m.node)
    assert cache.evict(1) == 1 and cache.num_blocks == 0


def test_admission_counts_a_locked_cached_prefix_once():
    """A cached prefix locked by a running sequence that holds copies of its own (it computed the
    prefix before it was cached) has blocks held by the cache alone; they are not evictable, and
    admitting a request that shares them must not count them as lost a second time."""
    bm = BlockManager(6, 2)
    b, a = Sequence([1, 2, 3, 4, 5]), Sequence([1, 2, 3, 4, 6])
    for s in (b, a):  # both computed from scratch, before anything was cached
        bm.allocate(s)
        s.num_computed_tokens = len(s)
    bm.cache_prefix(b)
    bm.cache_prefix(a)  # the prefix is B's blocks; A locks that node and keeps its own copies
    b_blocks = b.block_table[:2]
    bm.deallocate(b)
    assert bm.num_free == 1 and bm.num_available() == 1  # B's last block; the cached prefix is locked by A
    c = Sequence([1, 2, 3, 4, 7, 8])  # reuses the 2 cached blocks, needs 1 more
    assert bm.can_allocate(c)
    bm.allocate(c)
    assert c.block_table[:2] == b_blocks and c.num_cached_tokens == 4


def test_split_edge_on_partial_match():
    pool = BlockPool(8, 2)
    cache = RadixCache(pool)
    bs = [pool.allocate() for _ in range(3)]
    cache.insert([1, 2, 3, 4, 5, 6], bs)
    m = cache.match_prefix([1, 2, 3, 4, 9, 9])
    assert m.blocks == bs[:2] and m.num_tokens == 4
    other = pool.allocate()
    assert cache.insert([1, 2, 3, 4, 7, 7], bs[:2] + [other]) == 4
    assert cache.match_prefix([1, 2, 3, 4, 7, 7]).blocks == bs[:2] + [other]
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).blocks == bs


BS, NB = 4, 24
prompts = st.lists(st.integers(0, 3), min_size=1, max_size=14)


class BlockMachine(RuleBasedStateMachine):
    """Runs sequences against the manager and a fake KV store: ``kv[block][offset]`` = token."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NB, BS, prefix_cache=True)
        self.running: list[Sequence] = []
        self.kv: dict[int, list] = {b: [None] * BS for b in range(NB)}

    def _write(self, s: Sequence, upto: int):
        for p in range(s.num_computed_tokens, upto):
            self.kv[s.block_table[p // BS]][p % BS] = s.token_ids[p]
        s.num_computed_tokens = upto

    @rule(prompt=prompts, prefix=st.sampled_from([[], [7, 7, 7, 7], [7, 7, 7, 7, 8, 8, 8, 8]]))
    def add(self, prompt, prefix):
        s = Sequence(prefix + prompt)
        if self.bm.can_allocate(s):
            self.bm.allocate(s)
            assert s.num_cached_tokens % BS == 0 and s.num_cached_tokens < len(s)
            self._write(s, len(s))  # prefill
            self.running.append(s)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100), tok=st.integers(0, 3))
    def append(self, i, tok):
        s = self.running[i % len(self.running)]
        s.token_ids.append(tok)
        if not self.bm.can_append(s):
            s.token_ids.pop()
            return
        for src, dst in self.bm.may_append(s):
            self.kv[dst] = list(self.kv[src])
        self._write(s, len(s))

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def cache_running(self, i):
        self.bm.cache_prefix(self.running[i % len(self.running)])

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        parent = self.running[i % len(self.running)]
        child = Sequence(list(parent.token_ids), parent.num_prompt_tokens)
        self.bm.fork(parent, child)
        self.running.append(child)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100), cache=st.booleans())
    def finish(self, i, cache):
        s = self.running.pop(i % len(self.running))
        self.bm.deallocate(s, cache=cache)

    @rule(n=st.integers(1, 4))
    def evict(self, n):
        self.bm.cache.evict(n)

    @invariant()
    def reads_back_what_was_written(self):
        for s in self.running:
            for p in range(s.num_computed_tokens):
                assert self.kv[s.block_table[p // BS]][p % BS] == s.token_ids[p], (s, p)
        for node in self.bm.cache._nodes():  # cached blocks hold the tokens of their edge
            for j, b in enumerate(node.blocks):
                assert self.kv[b] == list(node.tokens[j * BS:(j + 1) * BS])

    @invariant()
    def refs_match_holders(self):
        pool = self.bm.pool
        holders = [0] * NB
        for s in self.running:
            for b in s.block_table:
                holders[b] += 1
        for node in self.bm.cache._nodes():
            for b in node.blocks:
                holders[b] += 1
        assert holders == pool.ref
        free = list(pool.free)
        assert len(free) == len(set(free)) and all(pool.ref[b] == 0 for b in free)
        assert sum(1 for r in pool.ref if r == 0) == len(free)
        nodes = list(self.bm.cache._nodes())
        # an unlocked cached block has no holder but the cache: eviction frees what it counts
        assert all(pool.ref[b] == 1 for n in nodes if n.lock_ref == 0 for b in n.blocks)
        assert self.bm.cache.evictable_blocks() == sum(len(n.blocks) for n in nodes if n.lock_ref == 0)
        assert self.bm.cache.num_blocks == sum(len(n.blocks) for n in nodes) and self.bm.cache.num_nodes == len(nodes)
        leaves = [n for n in nodes if not n.children and n.lock_ref == 0]  # eviction takes the least recent
        assert self.bm.cache._lru_leaf() is (min(leaves, key=lambda n: n.last_access) if leaves else None)
        if not self.running:
            assert pool.num_free == NB - self.bm.num_cached
            assert all(n.lock_ref == 0 for n in self.bm.cache._nodes())


TestBlockMachine = BlockMachine.TestCase
TestBlockMachine.settings = __import__("hypothesis").settings(max_examples=150, stateful_step_count=40,
                                                              deadline=None)


def step_inputs_ref(block_tables, num_cached, new_tokens, block_size):
    """Token by token, each input built as its own list."""
    ids, pos, slots, lens, starts = [], [], [], [], [0]
    for table, n0, toks in zip(block_tables, num_cached, new_tokens):
        for j, t in enumerate(toks):
            p = n0 + j
            ids.append(t)
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        lens.append(n0 + len(toks))
        starts.append(starts[-1] + len(toks))
    width = max(1, max(len(t) for t in block_tables))
    tables = [list(t) + [0] * (width - len(t)) for t in block_tables]
    return [torch.tensor(x, dtype=torch.long) for x in (ids, pos, slots, tables, lens, starts, [s - 1 for s in starts[1:]])]


@given(st.integers(1, 8), st.lists(st.tuples(st.integers(0, 40), st.integers(1, 9), st.integers(0, 3)),
                                   min_size=1, max_size=6), st.booleans())
def test_step_inputs_equal_reference(bs, seqs, decode):
    """Decode steps (one token each) and mixed prefill steps; tables with spare blocks."""
    tables, cached, new = [], [], []
    for k, (n0, n_new, spare) in enumerate(seqs):
        n_new = 1 if decode else n_new
        nblocks = -(-(n0 + n_new) // bs) + spare
        tables.append([(7 * k + 3 * j) % 50 for j in range(nblocks)])
        cached.append(n0)
        new.append([(n0 + j) % 13 for j in range(n_new)])
    got = step_inputs(tables, cached, new, bs)
    for g, r in zip(got, step_inputs_ref(tables, cached, new, bs)):
        assert g.dtype == torch.long and g.shape == r.shape and torch.equal(g, r)
    assert got.is_decode == all(len(t) == 1 for t in new)


def test_decode_staging_pads_rows_and_tables():
    """A CUDA-graph decode step's inputs as the graph of 8 rows reads them, sent as one staged
    buffer: real rows, then padding rows that write no KV and read one token. A narrower step
    after a wider one leaves old columns in the wide table, past what its sequences read."""
    from qcompiler.runtime.cuda_graphs import DecodeBuffers, send_decode, stage_decode
    host, dev = DecodeBuffers.new(8, 5, "cpu"), DecodeBuffers.new(8, 5, "cpu")
    tables = torch.zeros(8, 5, dtype=torch.long)
    for step_tables, cached in [([[4, 9, 1, 3], [7]], [50, 3]), ([[4, 9], [7], [2, 5, 6]], [20, 3, 33])]:
        host.flat.fill_(99)  # whatever the pinned buffer held
        inp = step_inputs(step_tables, cached, [[11 + i] for i in range(len(cached))], 16)
        S, W = inp.block_tables.shape
        send_decode(host, dev, tables, S, W, stage_decode(inp, host))
        assert dev.input_ids.tolist() == [11 + i for i in range(S)] + [0] * (8 - S)
        assert dev.positions.tolist() == cached + [0] * (8 - S)
        assert dev.slot_mapping.tolist() == inp.slot_mapping.tolist() + [-1] * (8 - S)
        assert dev.seq_lens.tolist() == [c + 1 for c in cached] + [1] * (8 - S)
        for row, (t, c) in enumerate(zip(step_tables, cached)):  # the blocks each sequence reads
            assert tables[row, :-(-(c + 1) // 16)].tolist() == t[:-(-(c + 1) // 16)]
    assert tables[0].tolist() == [4, 9, 0, 3, 0]  # column 3 from the first step, past the second one's width
    for v in (dev.input_ids, dev.positions, dev.slot_mapping, dev.seq_lens):
        assert (v.data_ptr() - dev.flat.data_ptr()) % 128 == 0  # 16-element aligned views of one buffer
