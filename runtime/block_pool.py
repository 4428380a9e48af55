"""Physical KV blocks: a free list and a reference count per block. A block returns to the
free list when its last holder (a sequence's block table or the radix cache) lets go."""
from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0, f"need blocks and a block size, got {num_blocks}, {block_size}"
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        assert self.free, "no free block: check can_allocate first"
        b = self.free.popleft()
        assert self.ref[b] == 0, f"block {b} on the free list with ref {self.ref[b]}"
        self.ref[b] = 1
        return b

    def incref(self, b: int) -> None:
        assert self.ref[b] > 0, f"incref of free block {b}"
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        assert self.ref[b] > 0, f"decref of free block {b}"
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self.free.append(b)
