"""Serving runtime: KV blocks, the radix prefix cache, continuous batching and the engine."""
from .block_manager import BlockManager, CopyOp
from .block_pool import BlockPool
from .engine import Engine, ModelRunner, Request
from .radix_cache import MatchResult, RadixCache
from .sampling import SamplingParams, sample
from .scheduler import Schedule, Scheduler
from .sequence import Sequence, Status
from .step_inputs import StepInputs, single_sequence, step_inputs

__all__ = ["BlockManager", "BlockPool", "CopyOp", "Engine", "MatchResult", "ModelRunner", "RadixCache", "Request",
           "SamplingParams", "Schedule", "Scheduler", "Sequence", "Status", "StepInputs", "sample",
           "single_sequence", "step_inputs"]
