"""Serving runtime: KV blocks, the radix prefix cache, and (next) the scheduler and engine."""
from .block_manager import BlockManager, CopyOp
from .block_pool import BlockPool
from .radix_cache import MatchResult, RadixCache
from .sequence import Sequence, Status

__all__ = ["BlockManager", "BlockPool", "CopyOp", "MatchResult", "RadixCache", "Sequence", "Status"]
