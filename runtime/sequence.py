"""A request's tokens and its place in the KV cache."""
import itertools
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Optional

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)  # a sequence is itself: identity, not equal tokens (running-list lookups stay O(1) each)
class Sequence:
    token_ids: list[int]
    num_prompt_tokens: int = -1
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0    # prompt tokens whose KV came from the prefix cache
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (cached or computed)
    cache_node: Optional[object] = None  # radix node locked while this sequence runs
    use_prefix_cache: bool = True  # False: every prompt token is computed (its logits are wanted)

    def __post_init__(self):
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
